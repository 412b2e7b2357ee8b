"""Slide reading: :class:`Slide` (OpenSlide) and :class:`VirtualSlide` (numpy), units in base px and um/px.

Every read is served by a :class:`ReadPlan` (level, level-px box, output size): ``slide.read_plan(...)`` /
``slide.region_plan(...)`` say how, ``slide.read_planned(plan)`` reads it; tile grids use the same plans."""

from histolight.wsi.slide import (
    SLIDE_EXTENSIONS,
    BaseSlide,
    ReadPlan,
    Slide,
    open_slide,
    resize_area,
    rgba_to_rgb,
    slide_name,
)
from histolight.wsi.virtual import VirtualSlide

__all__ = [
    "SLIDE_EXTENSIONS",
    "BaseSlide",
    "ReadPlan",
    "Slide",
    "VirtualSlide",
    "open_slide",
    "resize_area",
    "rgba_to_rgb",
    "slide_name",
]
