"""Regions of interest: labelled polygons (with holes) in level-0 pixel coordinates.

Read and write Slideflow CSV (``roi_name,x_base,y_base[,label]``, one vertex per row) and QuPath
GeoJSON (Feature / FeatureCollection / list of features; Polygon and MultiPolygon with holes;
label from ``properties.classification.name``, name from ``properties.name``; QuPath detection objects --
cells, detections, tiles -- are skipped unless ``include_detections``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
import shapely.ops
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.validation import explain_validity, make_valid

from histolight.errors import ROIError
from histolight.io.atomic import atomic_write_text
from histolight.io.tables import json_default
from histolight.viz import label_color

log = logging.getLogger(__name__)

ROI_EXTENSIONS = (".geojson", ".json", ".csv")


@dataclass
class ROI:
    """One region of interest.

    Attributes:
        name: ROI name (unique within a slide by convention).
        geometry: shapely ``Polygon`` or ``MultiPolygon`` in **base px** (holes as interior rings).
        label: class name, or None when unlabelled.
        description: free text (QuPath ``properties.description`` / Slideflow ``roi_desc``).
    """

    name: str
    geometry: Polygon | MultiPolygon
    label: str | None = None
    description: str | None = None
    properties: dict = field(default_factory=dict, repr=False)

    @property
    def area(self) -> float:
        """Area in base px^2 (holes excluded)."""
        return float(self.geometry.area)

    @property
    def polygons(self) -> list[Polygon]:
        g = self.geometry
        return list(g.geoms) if isinstance(g, MultiPolygon) else [g]

    @property
    def n_holes(self) -> int:
        return sum(len(p.interiors) for p in self.polygons)

    def scaled(self, factor: float) -> ROI:
        """Copy with coordinates multiplied by ``factor`` (e.g. base px -> thumbnail px)."""
        g = shapely.affinity.scale(self.geometry, factor, factor, origin=(0, 0))
        return ROI(self.name, g, self.label, self.description, dict(self.properties))


# ---------------------------------------------------------------------------------------------- geometry


def _polygonal(geom) -> Polygon | MultiPolygon | None:
    """Keep only the areal part of ``geom`` (make_valid can return collections with lines)."""
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    polys = []
    for g in getattr(geom, "geoms", []):
        p = _polygonal(g)
        if p is not None:
            polys.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def clean_geometry(geom, where: str, repairs: list[tuple[str, str]] | None = None) -> Polygon | MultiPolygon:
    """Repair invalid geometry with ``make_valid``; raise :class:`ROIError` naming ``where`` if no area is left.

    Each repair is logged as a warning, or, with ``repairs``, appended to it as ``(where, reason)`` so a file
    reader can report all of a file's repairs in one warning (:func:`log_repairs`)."""
    if geom.is_empty:
        raise ROIError(f"{where}: empty geometry")
    if not geom.is_valid:
        reason = explain_validity(geom)
        fixed = _polygonal(make_valid(geom))
        if fixed is None or fixed.area <= 0:
            raise ROIError(f"{where}: invalid geometry ({reason}) that cannot be repaired into an area")
        if repairs is None:
            log.warning("%s: repaired invalid geometry (%s)", where, reason)
        else:
            repairs.append((where, reason))
        geom = fixed
    geom = _polygonal(geom)
    if geom is None or geom.area <= 0:
        raise ROIError(f"{where}: geometry has zero area")
    return geom


def log_repairs(path: str | os.PathLike, repairs: Sequence[tuple[str, str]], shown: int = 3) -> None:
    """One warning for all polygons of file ``path`` repaired by :func:`clean_geometry`: the count and the
    first ``shown`` ROIs with the reason (a real QuPath export can hold hundreds of self-intersections)."""
    if not repairs:
        return
    prefix = f"{path}: "
    examples = "; ".join(f"{w.removeprefix(prefix)} ({r})" for w, r in repairs[:shown])
    more = f"; and {len(repairs) - shown} more" if len(repairs) > shown else ""
    log.warning(
        "%s: repaired %d invalid polygon(s) with make_valid (the area is kept, self-intersections are split), e.g. %s%s",
        path,
        len(repairs),
        examples,
        more,
    )


def nest_holes(rois: Sequence[ROI]) -> list[ROI]:
    """Turn polygons nested inside a polygon of the same label into holes (Slideflow's convention).

    Nesting alternates: depth 1 is a hole of its parent, depth 2 an island inside that hole (a new
    ROI), and so on. ROIs with several parts (MultiPolygon) or existing holes are left as they are
    unless they are themselves nested.
    """
    if len(rois) < 2:
        return list(rois)
    order = sorted(range(len(rois)), key=lambda i: -rois[i].area)
    parent: dict[int, int | None] = {}
    tree = shapely.STRtree([r.geometry for r in rois])
    for rank, i in enumerate(order):
        gi = rois[i].geometry
        best, best_area = None, math.inf
        for j in tree.query(gi, predicate="within"):
            j = int(j)
            if j == i or rois[j].label != rois[i].label:
                continue
            # exact duplicates: the earlier one (larger or same area, earlier in order) is the parent
            if rois[j].area < rois[i].area or (rois[j].area == rois[i].area and order.index(j) > rank):
                continue
            # must sit inside the filled outline (a polygon inside a hole is not nested in it)
            if rois[j].area < best_area:
                best, best_area = j, rois[j].area
        parent[i] = best
    depth: dict[int, int] = {}

    def d(i: int) -> int:
        if i not in depth:
            depth[i] = 0 if parent[i] is None else d(parent[i]) + 1
        return depth[i]

    holes: dict[int, list[Polygon]] = {}
    for i in range(len(rois)):
        if d(i) % 2 == 1:
            holes.setdefault(parent[i], []).append(rois[i].geometry)
    out = []
    for i, r in enumerate(rois):
        if d(i) % 2 == 1:
            continue
        g = r.geometry
        if i in holes:
            g = clean_geometry(g.difference(shapely.unary_union(holes[i])), f"ROI '{r.name}'")
        out.append(ROI(r.name, g, r.label, r.description, r.properties))
    return out


def clip_to_slide(rois: Sequence[ROI], dims: tuple[int, int], source: str = "") -> list[ROI]:
    """Clip ROIs to the slide box ``(0, 0, w, h)`` (base px). Warn about clipped ROIs; drop ROIs fully outside."""
    box = shapely.box(0, 0, dims[0], dims[1])
    out = []
    for r in rois:
        if box.contains(r.geometry):
            out.append(r)
            continue
        inter = _polygonal(r.geometry.intersection(box))
        xmin, ymin, xmax, ymax = r.geometry.bounds
        if inter is None or inter.area <= 0:
            log.warning(
                "%sROI '%s' lies entirely outside the slide (%dx%d px; ROI bounds %.0f,%.0f-%.0f,%.0f): ignored. "
                "Are the coordinates in level-0 pixels of this slide?",
                f"{source}: " if source else "",
                r.name,
                dims[0],
                dims[1],
                xmin,
                ymin,
                xmax,
                ymax,
            )
            continue
        log.warning(
            "%sROI '%s' extends outside the slide (%dx%d px; ROI bounds %.0f,%.0f-%.0f,%.0f): clipped.",
            f"{source}: " if source else "",
            r.name,
            dims[0],
            dims[1],
            xmin,
            ymin,
            xmax,
            ymax,
        )
        out.append(ROI(r.name, inter, r.label, r.description, r.properties))
    return out


# ---------------------------------------------------------------------------------------------- CSV


def read_csv_rois(path: str | os.PathLike, nest: bool = True) -> list[ROI]:
    """Read a Slideflow ROI CSV: columns ``roi_name, x_base, y_base`` (any case) and optional ``label``.

    Rows sharing a ``roi_name`` are one ring, in file order. Nested rings of the same label become holes.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ROIError(f"{path}: empty ROI file (expected a header 'roi_name,x_base,y_base[,label]')")
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in ("roi_name", "x_base", "y_base") if c not in header]
    if missing:
        raise ROIError(
            f"{path}: missing required column(s) {missing}; found columns {header}. "
            "A Slideflow ROI CSV needs 'roi_name,x_base,y_base' and optionally 'label'."
        )
    ci = {c: header.index(c) for c in header}
    rings: dict[str, list[tuple[float, float]]] = {}
    labels: dict[str, str | None] = {}
    descs: dict[str, str | None] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            name = row[ci["roi_name"]].strip()
            x = float(row[ci["x_base"]])
            y = float(row[ci["y_base"]])
        except (IndexError, ValueError) as e:
            raise ROIError(f"{path}, line {lineno}: cannot parse {row!r} ({e})") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ROIError(f"{path}, line {lineno}: non-finite coordinate in {row!r}")
        rings.setdefault(name, []).append((x, y))
        if "label" in ci and ci["label"] < len(row):
            lab = row[ci["label"]].strip() or None
            if name in labels and labels[name] != lab:
                raise ROIError(f"{path}, line {lineno}: ROI '{name}' has two labels ({labels[name]!r} and {lab!r})")
            labels[name] = lab
        if "roi_desc" in ci and ci["roi_desc"] < len(row):
            descs[name] = row[ci["roi_desc"]].strip() or None
    if not rings:
        raise ROIError(f"{path}: the ROI file has a header but no vertices")
    rois: list[ROI] = []
    repairs: list[tuple[str, str]] = []
    for name, pts in rings.items():
        where = f"{path}: ROI '{name}'"
        if len(pts) < 3:
            log.warning("%s: only %d vertices (a polygon needs 3): ignored", where, len(pts))
            continue
        try:
            rois.append(ROI(name, clean_geometry(Polygon(pts), where, repairs), labels.get(name), descs.get(name)))
        except ROIError as e:
            log.warning("%s: ignored", e)
    log_repairs(path, repairs)
    return nest_holes(rois) if nest else rois


def _ring_rows(name: str, coords: Iterable[tuple[float, float]], label: str | None) -> list[list]:
    pts = list(coords)
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]  # Slideflow rings are implicitly closed
    return [[name, _num(x), _num(y), label or ""] for x, y in pts]


def _num(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 3)


def rois_to_csv(rois: Sequence[ROI]) -> str:
    """Slideflow CSV text. Holes are written as extra rings of the same label (``<name>_hole<k>``),
    extra parts of a MultiPolygon as ``<name>_part<k>``; reading nests them back."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["roi_name", "x_base", "y_base", "label"])
    for r in rois:
        for k, poly in enumerate(r.polygons):
            pname = r.name if k == 0 else f"{r.name}_part{k}"
            w.writerows(_ring_rows(pname, poly.exterior.coords, r.label))
            for h, ring in enumerate(poly.interiors):
                w.writerows(_ring_rows(f"{pname}_hole{h}", ring.coords, r.label))
    return buf.getvalue()


def write_csv_rois(rois: Sequence[ROI], path: str | os.PathLike) -> Path:
    """Write Slideflow CSV atomically."""
    atomic_write_text(path, rois_to_csv(rois))
    return Path(path)


# ---------------------------------------------------------------------------------------------- GeoJSON


def _features(obj, path) -> list[dict]:
    if isinstance(obj, list):
        return [f for o in obj for f in _features(o, path)]
    if not isinstance(obj, dict):
        raise ROIError(f"{path}: expected a GeoJSON object or list, found {type(obj).__name__}")
    t = obj.get("type")
    if t == "FeatureCollection":
        return list(obj.get("features") or [])
    if t == "Feature":
        return [obj]
    if t in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise ROIError(f"{path}: unsupported GeoJSON type {t!r} (expected FeatureCollection, Feature, Polygon or MultiPolygon)")


def _label_of(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        if c.get("name"):
            return str(c["name"])
        if c.get("names"):  # QuPath >= 0.4 derived classes
            return ": ".join(str(n) for n in c["names"])
    if isinstance(c, str) and c:
        return c
    for key in ("label", "class", "classification_name"):
        if props.get(key):
            return str(props[key])
    return None


#: QuPath object types that are detections, not annotations: ``properties.objectType`` (QuPath >= 0.3) or the
#: feature ``id`` of QuPath 0.2 exports (``PathCellObject``, ...)
DETECTION_TYPES = ("cell", "detection", "tile")
_LEGACY_TYPES = {"PathCellObject": "cell", "PathDetectionObject": "detection", "PathTileObject": "tile"}


def _detection_type(feat: dict, props: dict) -> str | None:
    """``cell`` / ``detection`` / ``tile`` for a QuPath detection object, None for annotations and plain features."""
    t = props.get("objectType") or props.get("object_type")
    if isinstance(t, str) and t.lower() in DETECTION_TYPES:
        return t.lower()
    return _LEGACY_TYPES.get(str(feat.get("id")))


def read_geojson_rois(path: str | os.PathLike, nest: bool = True, include_detections: bool = False) -> list[ROI]:
    """Read QuPath GeoJSON annotations. Non-areal geometries (points, lines) are skipped with a warning.

    QuPath detection objects (cells, detections, tiles: ``objectType`` or the QuPath 0.2 feature id) are not
    regions of interest: they are skipped with one warning per file unless ``include_detections``. Polygons
    repaired by :func:`clean_geometry` are reported in one warning per file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ROIError(f"{path}: empty ROI file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ROIError(f"{path}: not valid JSON ({e})") from None
    rois: list[ROI] = []
    repairs: list[tuple[str, str]] = []
    skipped: dict[str, int] = {}
    for k, feat in enumerate(_features(obj, path)):
        props = feat.get("properties") or {}
        kind = _detection_type(feat, props)
        if kind is not None and not include_detections:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        fid = feat.get("id")
        fid = None if str(fid).startswith("Path") and str(fid).endswith("Object") else fid  # QuPath 0.2: the type
        name = str(props.get("name") or fid or f"roi_{k}")
        where = f"{path}: ROI '{name}' (feature {k})"
        geom = feat.get("geometry")
        if not geom:
            log.warning("%s: no geometry: ignored", where)
            continue
        try:
            g = shape(geom)
        except Exception as e:  # noqa: BLE001 - shapely raises several types on bad coordinates
            log.warning("%s: malformed geometry (%s): ignored", where, e)
            continue
        g = _polygonal(g) if g.geom_type == "GeometryCollection" else g
        if g is None or g.geom_type not in ("Polygon", "MultiPolygon"):
            log.warning("%s: %s geometry has no area: ignored", where, getattr(g, "geom_type", "empty"))
            continue
        try:
            g = clean_geometry(g, where, repairs)
        except ROIError as e:
            log.warning("%s: ignored", e)
            continue
        rois.append(ROI(name, g, _label_of(props), props.get("description"), props))
    log_repairs(path, repairs)
    if skipped:
        log.warning(
            "%s: skipped %d detection object(s) (%s): only QuPath annotations are read as ROIs; set "
            "include_detections=true (config key dataset.include_detections) to read cells and detections as ROIs",
            path,
            sum(skipped.values()),
            ", ".join(f"{n} {t}" for t, n in sorted(skipped.items())),
        )
    if not rois:
        log.warning("%s: no polygon ROIs found", path)
    return nest_holes(rois) if nest else rois


def _color(label: str | None) -> list[int]:
    """QuPath classification colour: the label's colour in every histolight picture (:func:`histolight.viz.label_color`)."""
    return list(label_color(label))


def rois_to_geojson(rois: Sequence[ROI]) -> dict:
    """QuPath-compatible FeatureCollection (``objectType: annotation``)."""
    feats = []
    for r in rois:
        props = {"objectType": "annotation", "name": r.name}
        if r.label:
            props["classification"] = {"name": r.label, "color": _color(r.label)}
        if r.description:
            props["description"] = r.description
        feats.append(
            {
                "type": "Feature",
                "geometry": mapping(
                    shapely.geometry.polygon.orient(r.geometry) if isinstance(r.geometry, Polygon) else r.geometry
                ),
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def write_geojson_rois(rois: Sequence[ROI], path: str | os.PathLike) -> Path:
    """Write QuPath GeoJSON atomically."""
    atomic_write_text(path, json.dumps(rois_to_geojson(rois), default=json_default))
    return Path(path)


# ---------------------------------------------------------------------------------------------- dispatch


def read_rois(
    path: str | os.PathLike,
    slide_dims: tuple[int, int] | None = None,
    nest: bool = True,
    include_detections: bool = False,
) -> list[ROI]:
    """Read ROIs from ``.csv`` (Slideflow) or ``.geojson``/``.json`` (QuPath); clip to ``slide_dims`` (w, h, base px)
    if given. ``include_detections``: also read QuPath cell/detection objects as ROIs (see :func:`read_geojson_rois`)."""
    path = Path(path)
    if not path.exists():
        raise ROIError(f"{path}: ROI file not found")
    ext = path.suffix.lower()
    if ext == ".csv":
        rois = read_csv_rois(path, nest=nest)
    elif ext in (".geojson", ".json"):
        rois = read_geojson_rois(path, nest=nest, include_detections=include_detections)
    else:
        raise ROIError(f"{path}: unknown ROI file type {ext!r} (expected .csv, .geojson or .json)")
    if slide_dims is not None:
        rois = clip_to_slide(rois, slide_dims, str(path))
    return rois


def write_rois(rois: Sequence[ROI], path: str | os.PathLike) -> Path:
    """Write ROIs by extension: ``.csv`` -> Slideflow CSV, ``.geojson``/``.json`` -> QuPath GeoJSON."""
    ext = Path(path).suffix.lower()
    if ext == ".csv":
        return write_csv_rois(rois, path)
    if ext in (".geojson", ".json"):
        return write_geojson_rois(rois, path)
    raise ValueError(f"unknown ROI file type {ext!r} (expected .csv or .geojson)")


def rasterize_rois(
    rois: Sequence[ROI],
    out_shape: tuple[int, int],
    scale: float,
    labels: Sequence[str] | None = None,
    mode: str = "multiclass",
) -> np.ndarray:
    """Rasterize ROIs (base px) into a mask of ``out_shape`` (h, w); pixel = base px * ``scale``.

    Modes:
        ``binary``: ``(h, w)`` uint8, 1 inside any ROI (restricted to ``labels`` if given).
        ``multiclass``: ``(h, w)`` uint8, 0 = background, ``i + 1`` for ``labels[i]``; later ROIs
            paint over earlier ones, holes are respected (a hole shows what lies beneath).
        ``multilabel``: ``(len(labels), h, w)`` uint8 with one channel per label.
    """
    import cv2

    h, w = out_shape

    def draw(target: np.ndarray, geom, value: int):
        polys = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]
        layer = np.zeros((h, w), np.uint8)
        for p in polys:
            ext = np.round(np.asarray(p.exterior.coords)[:, :2] * scale - 0.5).astype(np.int32)
            cv2.fillPoly(layer, [ext], 1)
            for ring in p.interiors:
                hole = np.round(np.asarray(ring.coords)[:, :2] * scale - 0.5).astype(np.int32)
                cv2.fillPoly(layer, [hole], 0)
        target[layer > 0] = value

    if mode == "multilabel":
        if not labels:
            raise ValueError("multilabel rasterization needs a labels list")
        out = np.zeros((len(labels), h, w), np.uint8)
        for r in rois:
            if r.label in labels:
                draw(out[labels.index(r.label)], r.geometry, 1)
        return out
    out = np.zeros((h, w), np.uint8)
    for r in rois:
        if labels is not None and r.label not in labels:
            continue
        if mode == "binary":
            draw(out, r.geometry, 1)
        elif mode == "multiclass":
            if labels is None:
                raise ValueError("multiclass rasterization needs a labels list")
            draw(out, r.geometry, labels.index(r.label) + 1)
        else:
            raise ValueError(f"mode must be binary, multiclass or multilabel, got {mode!r}")
    return out
