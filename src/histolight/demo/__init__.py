"""Deterministic synthetic demo cohort: pyramidal Aperio-style SVS slides with labelled ROIs.

Each slide is white background with one or two tissue pieces split into regions of three
classes with distinct colour and texture (made by mixing haematoxylin and eosin optical densities):

- ``tumor``: dense, large, dark nuclei on purple cytoplasm;
- ``stroma``: pink oriented fibres with sparse small nuclei;
- ``necrosis``: pale, greyish eosin with fine dark debris.

With ``glands`` > 0 (the fine-scale variant, ``conf/dataset/demo_fine.yaml``) each slide also gets that many
gland-like objects (label ``gland``, class 4 in the masks: a ring of dense nucleated epithelium, 4-9 um thick, round
a pale lumen; 15-35 um radius) painted over the tissue, for segmentation at 0.5-1 um/px. They come from their own
random stream, so the rest of each slide is the same as without them; ``glands: 0`` (the default) generates
exactly the three-class cohort.

Some slides carry a green pen mark and an out-of-focus (blurred) region for QC. Ground truth is
written next to the slides::

    <root>/slides/<slide>.svs            JPEG-tiled pyramid (levels 1, 4, 16, ...), MPP in the description
    <root>/rois/<slide>.csv              Slideflow CSV ROIs (roi_name,x_base,y_base,label)
    <root>/rois_qupath/<slide>.geojson   the same ROIs as QuPath GeoJSON
    <root>/masks/<slide>.png             exact class mask at level 0 (0=background, 1..3 = CLASSES)
    <root>/qc/<slide>.json               pen and blur polygons (base px) and their areas
    <root>/annotations.csv               patient,slide,label,split
    <root>/manifest.json                 generator parameters and the digest of every generated file; written
                                         last (``config`` set = complete)

Regenerating with other parameters keeps files the user edited or added and removes only generated files that
are no longer part of the cohort (:mod:`histolight.demo.manifest`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
import shapely.affinity
import shapely.ops
from shapely.geometry import MultiPoint, MultiPolygon, Polygon

from histolight.demo.manifest import (
    COHORT_FILES,
    MANIFEST,
    mark_incomplete,
    place,
    previous_record,
    remove_stale,
    slide_files,
    warn_kept,
)
from histolight.io.atomic import atomic_write, atomic_write_json
from histolight.io.tables import json_default
from histolight.roi import ROI, rasterize_rois, rois_to_csv, rois_to_geojson

log = logging.getLogger(__name__)

CLASSES = ("tumor", "stroma", "necrosis")
#: the fine-scale label of the ``glands`` variant
GLAND = "gland"
GENERATOR_VERSION = 1

# Ruifrok & Johnston stain vectors (optical density per RGB channel), normalised.
_H = np.array([0.65, 0.70, 0.29], np.float32)
_E = np.array([0.07, 0.99, 0.11], np.float32)
_H /= np.linalg.norm(_H)
_E /= np.linalg.norm(_E)


@dataclass
class DemoConfig:
    """Parameters of the demo cohort (all sizes in level-0 px; ``mpp`` in um/px)."""

    n_slides: int = 10
    seed: int = 0
    width: int = 4096
    height: int = 3072
    mpp: float = 0.5
    tile: int = 256
    quality: int = 90
    workers: int = 2
    glands: int = 0

    def __post_init__(self):
        if self.n_slides < 1:
            raise ValueError(f"demo.n_slides must be >= 1, got {self.n_slides}")
        if self.width < 512 or self.height < 512:
            raise ValueError(f"demo.width/height must be >= 512 px, got {self.width}x{self.height}")
        if not self.mpp > 0:
            raise ValueError(f"demo.mpp must be > 0 um/px, got {self.mpp}")
        if not (isinstance(self.glands, int) and self.glands >= 0):
            raise ValueError(f"demo.glands must be an integer >= 0 (gland-like objects per slide), got {self.glands!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        """The ROI labels of the cohort, in mask order (class ``i + 1``)."""
        return CLASSES + (GLAND,) if self.glands else CLASSES

    def key(self) -> dict:
        d = asdict(self)
        d.pop("workers")
        if not self.glands:  # the three-class cohort keeps the key (and manifest) it always had
            d.pop("glands")
        d["version"] = GENERATOR_VERSION
        return d


# ---------------------------------------------------------------------------------------------- geometry


def _blob(cx: float, cy: float, r: float, rng: np.random.Generator, n: int = 72, wobble: float = 0.18) -> Polygon:
    """A smooth irregular closed shape around (cx, cy) with mean radius r."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in range(2, 6):
        rad += wobble / k * rng.uniform(0.5, 1.5) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([cx + r * rad * np.cos(t), cy + r * rad * np.sin(t)], 1)
    return shapely.make_valid(Polygon(pts)).buffer(0)


def _layout(cfg: DemoConfig, rng: np.random.Generator, index: int) -> list[ROI]:
    """Tissue pieces split into labelled Voronoi regions; the largest tumor region gets a necrotic core (a hole)."""
    W, H = cfg.width, cfg.height
    n_pieces = 1 + int(rng.integers(0, 2))
    pieces = []
    if n_pieces == 1:
        pieces.append(_blob(W * rng.uniform(0.45, 0.55), H * rng.uniform(0.45, 0.55), 0.36 * min(W, H), rng))
    else:
        for k in range(2):
            pieces.append(_blob(W * (0.27 + 0.46 * k), H * rng.uniform(0.42, 0.58), 0.3 * min(W / 2, H), rng))
    canvas = shapely.box(0, 0, W, H).buffer(-16)
    rois: list[ROI] = []
    order = list(rng.permutation(len(CLASSES)))
    ci = index % len(CLASSES)
    for piece in pieces:
        piece = piece.intersection(canvas)
        xmin, ymin, xmax, ymax = piece.bounds
        seeds = []
        while len(seeds) < int(rng.integers(3, 6)):
            p = shapely.Point(rng.uniform(xmin, xmax), rng.uniform(ymin, ymax))
            if piece.contains(p):
                seeds.append(p)
        cells = shapely.voronoi_polygons(MultiPoint(seeds), extend_to=piece.envelope.buffer(10))
        for cell in cells.geoms:
            region = cell.intersection(piece)
            if region.is_empty or region.area < 0.002 * W * H:
                continue
            label = CLASSES[order[ci % len(CLASSES)]]
            ci += 1
            parts = list(region.geoms) if isinstance(region, MultiPolygon) else [region]
            for part in parts:
                if isinstance(part, Polygon) and part.area > 0.001 * W * H:
                    rois.append(ROI(f"roi_{len(rois)}", shapely.set_precision(part, 1.0), label))
    # central necrosis: the widest tumor ROI (else the widest ROI) gets a hole holding another ROI
    cands = [r for r in rois if r.label == "tumor"] or rois
    poles = [(shapely.ops.polylabel(r.geometry, tolerance=2.0), r) for r in cands]
    pole, t = max(poles, key=lambda pr: pr[0].distance(pr[1].geometry.exterior))
    d = pole.distance(t.geometry.exterior)
    if d > max(12.0, 0.015 * min(W, H)):
        core = shapely.set_precision(_blob(pole.x, pole.y, 0.5 * d, rng, wobble=0.1), 1.0)
        core = core.intersection(t.geometry.buffer(-4))
        if isinstance(core, Polygon) and not core.is_empty:
            t.geometry = shapely.set_precision(t.geometry.difference(core), 1.0)
            inner = "necrosis" if t.label != "necrosis" else "tumor"
            rois.append(ROI(f"roi_{len(rois)}", core, inner, f"central {inner}"))
    return rois


# ---------------------------------------------------------------------------------------------- texture


def _noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise, standardised (mean 0, std 1), float32."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigma)
    return (n - n.mean()) / (n.std() + 1e-6)


def _lowfreq(shape, cell: int, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    small = rng.standard_normal((max(2, h // cell), max(2, w // cell))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _fibres(shape, rng: np.random.Generator, angle: float) -> np.ndarray:
    n = rng.standard_normal(shape, dtype=np.float32)
    k = np.zeros((31, 31), np.float32)
    c = 15
    dx, dy = math.cos(angle), math.sin(angle)
    for s in np.linspace(-14, 14, 57):
        k[int(round(c + s * dy)), int(round(c + s * dx))] = 1
    k /= k.sum()
    f = cv2.filter2D(cv2.GaussianBlur(n, (0, 0), 0.8), -1, k)
    return (f - f.mean()) / (f.std() + 1e-6)


def _soft(x: np.ndarray, thr: float, gain: float = 3.0) -> np.ndarray:
    return np.clip((x - thr) * gain, 0, 1)


def _render(cfg: DemoConfig, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H&E-like RGB image from a class label map (0 background, 1..3 = CLASSES)."""
    shape = labels.shape
    hc = np.zeros(shape, np.float32)  # haematoxylin concentration
    ec = np.zeros(shape, np.float32)  # eosin concentration
    grey = np.zeros(shape, np.float32)
    px = 0.5 / cfg.mpp  # texture scale relative to 0.5 um/px

    m = labels == 1  # tumor
    nuc = _soft(_noise(shape, 3.2 * px, rng), 0.35)
    low = _lowfreq(shape, 64, rng)
    hc[m] = (0.32 + 1.05 * nuc + 0.06 * low)[m]
    ec[m] = (0.28 + 0.06 * low)[m]

    m = labels == 2  # stroma
    fib = _fibres(shape, rng, rng.uniform(0, np.pi))
    snuc = _soft(_noise(shape, 1.6 * px, rng), 2.1, 4)
    hc[m] = (0.05 + 0.85 * snuc)[m]
    ec[m] = (0.62 + 0.22 * fib)[m]

    m = labels == 3  # necrosis
    mottle = _lowfreq(shape, 24, rng)
    debris = _soft(_noise(shape, 1.1 * px, rng), 1.7, 4)
    hc[m] = (0.10 + 0.65 * debris + 0.04 * mottle)[m]
    ec[m] = (0.20 + 0.10 * mottle)[m]
    grey[m] = 0.09

    bg = labels == 0
    hv = _H + rng.normal(0, 0.02, 3).astype(np.float32)
    ev = _E + rng.normal(0, 0.02, 3).astype(np.float32)
    hs, es = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    od = (hs * np.clip(hc, 0, None))[..., None] * hv + (es * np.clip(ec, 0, None))[..., None] * ev + grey[..., None]
    od[bg] = 0.045
    od += 0.012 * rng.standard_normal(shape, dtype=np.float32)[..., None]
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def _add_pen(img: np.ndarray, rng: np.random.Generator, mpp: float) -> Polygon:
    h, w = img.shape[:2]
    x0 = rng.uniform(0.05, 0.2) * w
    pts = np.stack(
        [np.linspace(x0, x0 + rng.uniform(0.3, 0.5) * w, 6), rng.uniform(0.1, 0.3) * h + rng.normal(0, 0.03 * h, 6)], 1
    )
    thick = max(8, int(round(60 * 0.5 / mpp)))
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [pts.astype(np.int32)], False, 1, thickness=thick, lineType=cv2.LINE_8)
    ink = np.array([40, 150, 70], np.float32)
    sel = mask > 0
    img[sel] = (0.2 * img[sel] + 0.8 * ink).astype(np.uint8)
    return shapely.LineString(pts).buffer(thick / 2, cap_style="flat")


def _add_blur(img: np.ndarray, tissue: Polygon, rng: np.random.Generator, frac: float, mpp: float) -> Polygon:
    """Blur an ellipse covering about ``frac`` of the tissue area; returns its polygon."""
    c = tissue.representative_point()
    r = math.sqrt(frac * tissue.area / math.pi)
    region = shapely.affinity.scale(c.buffer(r, 64), 1.3, 0.77)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in region.buffer(40).bounds)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    crop = img[y0:y1, x0:x1]
    blurred = cv2.GaussianBlur(crop, (0, 0), 5.0 * 0.5 / mpp)
    m = np.zeros(crop.shape[:2], np.uint8)
    pts = (np.asarray(region.exterior.coords) - [x0, y0]).astype(np.int32)
    cv2.fillPoly(m, [pts], 1)
    img[y0:y1, x0:x1][m > 0] = blurred[m > 0]
    return region


def _add_glands(img: np.ndarray, tissue, cfg: DemoConfig, rng: np.random.Generator) -> list[ROI]:
    """Paint ``cfg.glands`` gland-like objects inside ``tissue`` (base px) into ``img``; returns their ROIs."""
    px = 1.0 / cfg.mpp  # px per um
    placed: list[tuple[float, float, float]] = []
    xmin, ymin, xmax, ymax = tissue.bounds
    inner = tissue.buffer(-40 * px)
    for _ in range(cfg.glands * 40):
        if len(placed) >= cfg.glands or inner.is_empty:
            break
        r = rng.uniform(15, 35) * px
        x, y = rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)
        if not shapely.contains_xy(inner, x, y) or any(math.hypot(x - a, y - b) < r + c + 6 * px for a, b, c in placed):
            continue
        placed.append((x, y, r))
    rois = []
    h, w = img.shape[:2]
    for x, y, r in placed:
        outer = shapely.set_precision(_blob(x, y, r, rng, n=48, wobble=0.12), 1.0)
        lumen = outer.buffer(-rng.uniform(4, 9) * px)
        x0, y0 = max(0, int(x - 1.5 * r)), max(0, int(y - 1.5 * r))
        x1, y1 = min(w, int(x + 1.5 * r) + 1), min(h, int(y + 1.5 * r) + 1)
        crop = img[y0:y1, x0:x1]
        ring = np.zeros(crop.shape[:2], np.uint8)
        cv2.fillPoly(ring, [np.round(np.asarray(outer.exterior.coords) - [x0, y0]).astype(np.int32)], 1)
        if isinstance(lumen, Polygon) and not lumen.is_empty:
            cv2.fillPoly(ring, [np.round(np.asarray(lumen.exterior.coords) - [x0, y0]).astype(np.int32)], 2)
        nuc = _soft(_noise(ring.shape, 1.5 * px, rng), 0.2)
        od = np.where(ring == 1, 0.75 + 0.6 * nuc, 0.0)[..., None] * _H + np.where(ring == 1, 0.3, 0.06)[..., None] * _E
        od += 0.012 * rng.standard_normal(ring.shape, dtype=np.float32)[..., None]
        rgb = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
        crop[ring > 0] = rgb[ring > 0]
        rois.append(ROI(f"gland_{len(rois)}", outer, GLAND))
    return rois


# ---------------------------------------------------------------------------------------------- writing


def aperio_svs_bytes(
    image: np.ndarray, mpp: float, tile: int = 256, quality: int = 90, min_level_px: int = 192, name: str = "demo"
) -> bytes:
    """``image`` (H x W x 3 uint8) as an Aperio-style JPEG-tiled pyramid (downsample 4 per level), in memory.

    The description carries ``MPP`` and ``AppMag`` so OpenSlide reports ``openslide.mpp-x``.
    """
    import tifffile

    h, w = image.shape[:2]
    mag = round(10.0 / mpp)
    levels = [image]
    while min(levels[-1].shape[:2]) // 4 >= min_level_px or len(levels) < 3:
        lv = levels[-1]
        nxt = cv2.resize(lv, (max(1, lv.shape[1] // 4), max(1, lv.shape[0] // 4)), interpolation=cv2.INTER_AREA)
        levels.append(nxt)
        if min(nxt.shape[:2]) < 16:
            break
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, bigtiff=image.nbytes > 2**31) as tif:
        for k, lv in enumerate(levels):
            lh, lw = lv.shape[:2]
            desc = (
                f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                f"JPEG/RGB Q={quality}"
                + ("" if k == 0 else f" -> {lw}x{lh}")
                + f"|AppMag = {mag}|MPP = {mpp:.4f}|Filename = {name}"
            )
            tif.write(
                lv,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=desc,
                metadata=None,
                subfiletype=0 if k == 0 else 1,
            )
    return buf.getvalue()


def write_aperio_svs(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    tile: int = 256,
    quality: int = 90,
    min_level_px: int = 192,
    name: str | None = None,
) -> None:
    """Write ``image`` as an Aperio-style pyramid (:func:`aperio_svs_bytes`), atomically."""
    data = aperio_svs_bytes(image, mpp, tile, quality, min_level_px, name or Path(path).stem)
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=json_default) + "\n").encode()


def _make_slide(args) -> dict:
    """Slide ``index``'s files (``files``: relative path -> bytes, :func:`slide_files`) and its summary."""
    cfg, index = args
    rng = np.random.default_rng([cfg.seed, index])
    name = f"demo_{index:03d}"
    rois = _layout(cfg, rng, index)
    labels = rasterize_rois(rois, (cfg.height, cfg.width), 1.0, labels=list(CLASSES), mode="multiclass")
    img = _render(cfg, labels, rng)
    tissue = shapely.unary_union([r.geometry for r in rois])
    if cfg.glands:  # own random stream: the rest of the slide is unchanged
        glands = _add_glands(img, tissue, cfg, np.random.default_rng([cfg.seed, index, 1]))
        gmask = rasterize_rois(glands, labels.shape, 1.0, mode="binary")
        labels = np.where(gmask > 0, np.uint8(len(CLASSES) + 1), labels)
        rois = rois + glands
    qc = {"pen": None, "blur": None}
    if index % 2 == 0:
        qc["pen"] = shapely.geometry.mapping(_add_pen(img, rng, cfg.mpp))
    blur_frac = 0.15 if index == 0 else (0.03 if index % 3 == 1 else 0.0)
    if blur_frac:
        region = _add_blur(img, tissue, rng, blur_frac, cfg.mpp)
        qc["blur"] = shapely.geometry.mapping(region)
        qc["blur_tissue_fraction"] = float(region.intersection(tissue).area / tissue.area)
    else:
        qc["blur_tissue_fraction"] = 0.0
    ok, png = cv2.imencode(".png", labels)
    areas = {c: float(sum(r.area for r in rois if r.label == c)) for c in CLASSES}
    if cfg.glands:
        areas[GLAND] = float(sum(r.area for r in rois if r.label == GLAND))
    qc["class_area_px"] = areas
    svs, csv, geojson, mask, qc_file = slide_files(name)
    files = {
        svs: aperio_svs_bytes(img, cfg.mpp, cfg.tile, cfg.quality, name=name),
        csv: rois_to_csv(rois).encode(),
        geojson: json.dumps(rois_to_geojson(rois), default=json_default).encode(),
        mask: png.tobytes(),
        qc_file: _json_bytes(qc),
    }
    return {"slide": name, "class_area_px": areas, "label": max(CLASSES, key=areas.get), "n_rois": len(rois), "files": files}


def _split_of(patient_idx: int, n_patients: int) -> str:
    n_test = 1 if n_patients >= 4 else 0
    n_val = max(1, round(0.2 * n_patients)) if n_patients >= 2 else 0
    if patient_idx >= n_patients - n_test:
        return "test"
    if patient_idx >= n_patients - n_test - n_val:
        return "val"
    return "train"


def _slides(cfg: DemoConfig):
    """The slides' files and summaries, in order (worker processes when ``cfg.workers`` > 1)."""
    jobs = [(cfg, i) for i in range(cfg.n_slides)]
    workers = max(1, min(cfg.workers, cfg.n_slides, os.cpu_count() or 1))
    if workers == 1:
        yield from map(_make_slide, jobs)
        return
    with ProcessPoolExecutor(workers) as ex:
        yield from ex.map(_make_slide, jobs)


def generate_demo(root: str | os.PathLike, cfg: DemoConfig | None = None, **overrides) -> Path:
    """Generate the demo cohort into ``root`` (see module docstring). Returns ``root``.

    Deterministic for a given :class:`DemoConfig`. Patients: slides 0-1 and 2-3 share a patient,
    so patient-level splits are exercised. Over an earlier cohort, files the user edited or added are kept (with a
    warning) and generated files that are no longer part of the cohort are removed (:mod:`histolight.demo.manifest`).
    """
    cfg = cfg or DemoConfig(**overrides)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    known = previous_record(root)
    writing: dict[str, str] = {}
    kept: list[str] = []

    def put(blobs: dict[str, bytes]) -> None:
        writing.update({rel: hashlib.sha1(data).hexdigest() for rel, data in blobs.items()})
        mark_incomplete(root, known, writing)  # recorded before written: an interruption leaves nothing unknown
        kept.extend(rel for rel, data in blobs.items() if not place(root, rel, data, writing[rel], known))

    from tqdm.auto import tqdm

    results = []
    for r in tqdm(_slides(cfg), total=cfg.n_slides, desc=f"demo slides -> {root}", unit="slide"):
        put(r.pop("files"))
        results.append(r)
    # patients: 0,1 -> p000; 2,3 -> p001; then one slide per patient
    pidx = [min(i // 2, 1) if i < 4 else i - 2 for i in range(cfg.n_slides)]
    n_pat = max(pidx) + 1
    lines = ["patient,slide,label,split"]
    for r, p in zip(results, pidx):
        lines.append(f"p{p:03d},{r['slide']},{r['label']},{_split_of(p, n_pat)}")
    labels = {"0": "background", **{str(i + 1): c for i, c in enumerate(cfg.classes)}}
    put(dict(zip(COHORT_FILES, ["\n".join(lines).encode() + b"\n", _json_bytes(labels)])))
    kept += remove_stale(root, known, set(writing))
    files = {rel: d for rel, d in sorted(writing.items()) if rel not in kept}
    atomic_write_json(root / MANIFEST, {"config": cfg.key(), "slides": results, "files": files})
    warn_kept(root, kept)
    return root


def ensure_demo(root: str | os.PathLike, cfg: DemoConfig | None = None, **overrides) -> Path:
    """Generate the demo cohort in ``root`` unless a complete one with the same parameters exists.

    Safe when several processes call it at once (a file lock serialises generation).
    """
    cfg = cfg or DemoConfig(**overrides)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def complete() -> bool:
        try:
            return json.loads((root / MANIFEST).read_text())["config"] == cfg.key()
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if complete():
        return root
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            log.info("Generating the demo cohort (%d slides) in %s ...", cfg.n_slides, root)
            generate_demo(root, cfg)
    return root


__all__ = ["CLASSES", "GLAND", "DemoConfig", "generate_demo", "ensure_demo", "aperio_svs_bytes", "write_aperio_svs"]
