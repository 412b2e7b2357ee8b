"""Slide reading: :class:`Slide` (OpenSlide) and :class:`VirtualSlide` (numpy), units in base px and um/px."""

from histolight.wsi.slide import (
    SLIDE_EXTENSIONS,
    BaseSlide,
    Slide,
    VirtualSlide,
    open_slide,
    resize_area,
    rgba_to_rgb,
    slide_name,
)

__all__ = ["SLIDE_EXTENSIONS", "BaseSlide", "Slide", "VirtualSlide", "open_slide", "resize_area", "rgba_to_rgb", "slide_name"]
