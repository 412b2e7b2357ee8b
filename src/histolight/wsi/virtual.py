"""An in-memory slide over a numpy array (tests, arrays from elsewhere), with the API of :class:`~histolight.wsi.Slide`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histolight.wsi.slide import BaseSlide, resize_area


class VirtualSlide(BaseSlide):
    """An in-memory slide over a numpy ``H x W x 3`` uint8 array, for tests and arrays from elsewhere.

    Args:
        image: level-0 pixels.
        mpp: base um/px (None to simulate a slide without mpp).
        downsamples: pyramid levels to build (area-resized copies).
        name: slide name.
    """

    def __init__(
        self, image: np.ndarray, mpp: float | None = 0.5, downsamples: Sequence[int] = (1, 4, 16), name: str = "virtual"
    ):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"VirtualSlide needs an H x W x 3 uint8 array, got shape {image.shape} dtype {image.dtype}")
        self.path = f"<memory:{name}>"
        self.name = name
        self.vendor = "virtual"
        self.properties = {}
        h, w = image.shape[:2]
        self._levels = []
        dims, dss = [], []
        for ds in downsamples:
            lw, lh = max(1, w // ds), max(1, h // ds)
            if ds > 1 and (lw < 2 or lh < 2):
                break
            self._levels.append(image if ds == 1 else resize_area(image, (lw, lh)))
            dims.append((lw, lh))
            dss.append(float(w) / lw if ds > 1 else 1.0)
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dss)
        self._file_mpp = float(mpp) if mpp is not None else None
        super().__init__(None)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.ascontiguousarray(self._levels[level][y : y + h, x : x + w])
