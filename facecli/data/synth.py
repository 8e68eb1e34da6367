"""The embedded default dataset: procedurally drawn faces in the real CASIA-WebFace and LFW layouts.

``facecli synth OUT_DIR`` writes, with no download::

    OUT_DIR/CASIA-webface/<7-digit id>/<nnn>.jpg                      training identities
    OUT_DIR/Labeled Faces in the Wild (LFW)/lfw_funneled/<Name>/<Name>_<NNNN>.jpg
    OUT_DIR/Labeled Faces in the Wild (LFW)/pairs.txt, pairsDevTrain.txt, pairsDevTest.txt,
        people.txt, peopleDevTrain.txt, peopleDevTest.txt, lfw-names.txt
    OUT_DIR/facecli-synth.json                      what wrote it, and how; written last, so it
                                                    means "complete" (an interrupted run leaves
                                                    .facecli-synth-incomplete instead)

so every loader, the trainer and the LFW protocol run on it exactly as on the real sets.
The test people are different people from the training ones, as in a real
train-on-CASIA / test-on-LFW setup; View 2's ten folds hold disjoint people, and so do
View 1's DevTrain and DevTest, as in LFW.

What an identity is (drawn once per person, never changes between their images):
face outline (ellipse axes, jaw narrowing, chin length, forehead width), skin tone;
eye spacing, height, size, aspect and tilt, iris colour; eyebrow thickness, length,
angle, arch, gap and colour; nose length and width; mouth height, width, lip
thickness and colour; ear size and height; hair colour and style (bald, short, side
part, fringe, long, volume/afro) with its hairline; and optional glasses (round or
rectangular, frame colour, sometimes dark lenses), beard (full, goatee, moustache)
and a mole at a fixed place on the cheek.

What varies between images of one person (nuisance, independent of identity):
in-plane rotation (+-12 degrees), translation and scale jitter; yaw, drawn as a
horizontal squash and shift of the inner features and a weaker one of the outline;
expression (smile or frown, open mouth, eye openness and blinks, raised eyebrows,
gaze); clothing colour; background (flat colour, gradient, smooth colour blobs or
random shapes); lighting (a directional gradient, brightness, contrast, colour cast);
blur, Gaussian noise and the JPEG quality (72-95).

Raw pixels are dominated by the nuisance (background, lighting, pose), so pixel
distance only weakly tells people apart, while the identity lives in geometry and
colours a network can learn; an untrained network scores well below a trained one.

Determinism: every random draw comes from a NumPy ``Generator`` seeded by a
``SeedSequence`` of (seed, split, person, image), so an image never depends on the
order of generation or on how many other people or images are asked for; JPEGs are
written by PIL with no EXIF or timestamps. The same arguments give byte-identical
files on the same platform and library versions.

Faces are drawn as polygons at 2x (4x below 64 px) the output size and reduced with a
box filter, which antialiases every edge. Images are ``image_size`` x ``image_size``,
i.e. already "aligned": the reader keeps the whole square (don't pick 250, the size
that :func:`facecli.data.images.decode_image` treats as raw, unaligned LFW and crops).
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facecli.errors import UserError

CASIA_DIR = "CASIA-webface"
LFW_DIR = "Labeled Faces in the Wild (LFW)"
LFW_IMAGES = "lfw_funneled"
MARKER = "facecli-synth.json"  # written last: the set is complete
PARTIAL_MARKER = ".facecli-synth-incomplete"  # written first: the folders are ours, generation not finished

FOLDS = 10
MAX_PAIRS_PER_FOLD = 300  # real pairs.txt
MAX_DEV_TRAIN_PAIRS = 1100  # real pairsDevTrain.txt
MAX_DEV_TEST_PAIRS = 500  # real pairsDevTest.txt
DEV_TRAIN_SHARE = 4038 / 5749  # real View 1: 4038 DevTrain people, 1711 DevTest people
MIN_TEST_IDENTITIES = 2 * FOLDS  # every View 2 fold needs two people for a mismatched pair
MAX_IDENTITIES = 300_000  # CASIA-style ids stay 7 digits (gaps are at most 30)
JPEG_QUALITY = (72, 95)

# SeedSequence "domains": one stream per purpose, so no two purposes share draws.
_TRAIN, _TEST, _NAMES, _PROTOCOL, _CASIA_IDS = 1, 2, 3, 4, 5
_IDENTITY, _IMAGE = 0, 1

_ID_DIR_RE = re.compile(r"^\d{7}$")
_ID_FILE_RE = re.compile(r"^\d{3,}\.jpg$")
_NAME_RE = re.compile(r"^[A-Z][a-z]+_[A-Z][a-z]+$")

Progress = Callable[[int], object]


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_synthetic_set` wrote."""

    out_dir: Path
    train_dir: Path  # OUT_DIR/CASIA-webface
    lfw_dir: Path  # OUT_DIR/Labeled Faces in the Wild (LFW)
    lfw_images_dir: Path  # .../lfw_funneled
    pairs_file: Path  # View 2: pairs.txt
    dev_train_pairs_file: Path  # View 1: pairsDevTrain.txt
    dev_test_pairs_file: Path  # View 1: pairsDevTest.txt
    protocol_files: tuple  # every text file written beside lfw_funneled/
    marker_file: Path  # OUT_DIR/facecli-synth.json
    train_identities: int
    train_images: int
    test_identities: int
    test_images: int
    pairs_per_fold: int  # matched (= mismatched) pairs per View 2 fold
    dev_train_pairs: int  # matched (= mismatched) pairs in pairsDevTrain.txt
    dev_test_pairs: int  # matched (= mismatched) pairs in pairsDevTest.txt
    image_size: int
    seed: int
    removed_stale: int  # files of an earlier, larger synthetic set deleted from OUT_DIR

    @property
    def images(self) -> int:
        return self.train_images + self.test_images


# =========================================================================== arguments


def _as_int(value, flag: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{flag} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{flag} must be an integer, got {value!r}.") from None


def _at_least(value, minimum: int, flag: str, why: str) -> int:
    v = _as_int(value, flag)
    if v < minimum:
        raise UserError(f"{flag} must be at least {minimum} ({why}); got {v}.")
    return v


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


# =========================================================================== names


_ONSETS = (
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "cl", "dr", "fr", "gr", "kr", "pr", "sh", "st", "th", "tr", "", "",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ie", "ou", "y")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "nd", "rt", "ck", "th", "x")


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))])
    parts.append(_CODAS[rng.integers(len(_CODAS))])
    return "".join(parts).capitalize()


def lfw_names(count: int, seed: int) -> list[str]:
    """``count`` unique ``Firstname_Lastname`` names (letters only), in generation order.

    Person ``k`` gets the same name whatever ``count`` is. Uniqueness is checked
    case-insensitively so the folders also coexist on case-insensitive file systems.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _NAMES, 0, 0, 0]))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        first = _word(rng, int(rng.integers(1, 3)))
        last = _word(rng, int(rng.integers(2, 4)))
        name = f"{first}_{last}"
        if len(first) < 3 or len(last) < 4 or name.lower() in seen:
            continue
        seen.add(name.lower())
        names.append(name)
    return names


def casia_ids(count: int, seed: int) -> list[str]:
    """Increasing 7-digit folder names with gaps, like CASIA-WebFace's ``0000045``, ``0000099``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CASIA_IDS, 0, 0, 0]))
    ids = 44 + np.cumsum(rng.integers(1, 31, size=count))
    return [f"{int(i):07d}" for i in ids]


# =========================================================================== identities

# Anchor colours (RGB) a person's colours are interpolated from, then jittered.
_SKIN = np.array(
    [(255, 226, 200), (238, 196, 164), (214, 160, 122), (178, 122, 86), (130, 84, 56), (86, 56, 40)], np.float64
)
_HAIR = np.array(
    [(22, 18, 18), (52, 36, 28), (94, 62, 40), (140, 64, 32), (196, 156, 92), (232, 208, 150),
     (140, 138, 136), (222, 220, 214)],
    np.float64,
)
_HAIR_P = np.array([0.22, 0.2, 0.16, 0.08, 0.1, 0.08, 0.1, 0.06])
_IRIS = np.array([(96, 58, 30), (48, 30, 20), (64, 110, 176), (76, 122, 70), (118, 128, 136), (132, 98, 48)], np.float64)
_FRAMES = np.array([(20, 20, 20), (70, 40, 24), (170, 170, 176), (150, 30, 40), (30, 50, 120), (200, 170, 90)], np.float64)

HAIR_STYLES = ("bald", "short", "side_part", "fringe", "long", "volume")
_STYLE_P = np.array([0.08, 0.27, 0.2, 0.15, 0.18, 0.12])
BEARDS = ("none", "full", "goatee", "moustache")


def _colour(c) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))


def _interp(anchors: np.ndarray, t: float) -> np.ndarray:
    x = t * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    return anchors[i] + (anchors[i + 1] - anchors[i]) * (x - i)


@dataclass(frozen=True)
class _Identity:
    """One person's fixed appearance, in face units (1 = canvas side, origin = face centre, y down)."""

    a: float  # face half-width
    b: float  # face half-height (upper half)
    jaw: float  # width factor at the chin
    chin: float  # lower half length factor
    forehead: float  # width factor at the top
    skin: tuple
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float  # radians, outer corner up when positive
    iris_r: float
    iris: tuple
    brow_gap: float
    brow_thick: float
    brow_len: float
    brow_angle: float
    brow_arch: float
    brow: tuple
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_low: float
    lip: tuple
    ear_w: float
    ear_h: float
    ear_y: float
    hair: tuple
    style: int
    volume: float
    hairline: float  # y of the hairline on the forehead
    part_tilt: float
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_dark: bool
    frame: tuple
    frame_w: float
    beard: int
    mole: tuple | None  # (x, y, r)


def _draw_identity(rng: np.random.Generator) -> _Identity:
    u = rng.uniform
    a = u(0.25, 0.31)
    b = a * u(1.15, 1.4)
    skin = _interp(_SKIN, u()) + rng.normal(0, 6, 3)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] + rng.normal(0, 10, 3)
    eye_w = u(0.042, 0.064)
    eye_h = eye_w * u(0.38, 0.6)
    eye_y = -b * u(0.12, 0.3)
    nose_y = eye_y + u(0.1, 0.16)
    chin = u(0.95, 1.12)
    mouth_y = min(nose_y + u(0.055, 0.095), b * chin * 0.72)
    brow_mix = u(0.45, 0.95)
    brow = hair * brow_mix + np.array([30, 22, 18]) * (1 - brow_mix)
    lip = skin * u(0.5, 0.75) + np.array([190, 70, 80]) * u(0.15, 0.4)
    style = int(rng.choice(len(HAIR_STYLES), p=_STYLE_P))
    glasses = int(rng.random() < 0.22) * int(rng.integers(1, 3))
    beard = int(rng.choice(len(BEARDS), p=[0.74, 0.1, 0.08, 0.08]))
    if rng.random() < 0.35:
        side = 1.0 if rng.random() < 0.5 else -1.0
        mole = (side * a * u(0.25, 0.65), u(-0.02, 0.2) * b + (nose_y - 0.04), u(0.007, 0.014))
    else:
        mole = None
    return _Identity(
        a=a, b=b, jaw=u(0.5, 0.9), chin=chin, forehead=u(0.88, 1.0), skin=_colour(skin),
        eye_dx=a * u(0.3, 0.44), eye_y=eye_y, eye_w=eye_w, eye_h=eye_h, eye_tilt=math.radians(u(-8, 8)),
        iris_r=eye_h * u(0.75, 1.05), iris=_colour(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)),
        brow_gap=eye_h + u(0.018, 0.05), brow_thick=u(0.009, 0.026), brow_len=u(1.0, 1.5),
        brow_angle=math.radians(u(-14, 16)), brow_arch=u(0.0, 0.022), brow=_colour(brow),
        nose_y=nose_y, nose_w=u(0.028, 0.052),
        mouth_y=mouth_y, mouth_w=u(0.055, 0.105), lip_up=u(0.007, 0.017), lip_low=u(0.009, 0.024),
        lip=_colour(lip),
        ear_w=u(0.024, 0.045), ear_h=u(0.05, 0.08), ear_y=u(-0.07, 0.03),
        hair=_colour(hair), style=style, volume=u(0.03, 0.11), hairline=-b * u(0.42, 0.68),
        part_tilt=u(0.25, 0.6) * (1 if rng.random() < 0.5 else -1),
        glasses=glasses, glasses_dark=bool(rng.random() < 0.2), frame=_colour(_FRAMES[rng.integers(len(_FRAMES))]),
        frame_w=u(0.005, 0.011), beard=beard, mole=mole,
    )


# =========================================================================== geometry

_TRIG: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _ellipse(cx, cy, rx, ry, n=24, angle=0.0) -> np.ndarray:
    if n not in _TRIG:
        t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        _TRIG[n] = (np.cos(t), np.sin(t))
    c, s = _TRIG[n]
    x, y = rx * c, ry * s
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        x, y = x * ca - y * sa, x * sa + y * ca
    return np.stack([x + cx, y + cy], axis=1)


def _outline(p: _Identity, t: np.ndarray, grow: float = 1.0) -> np.ndarray:
    """Points of the face outline at angles ``t`` (0 = right, pi/2 = chin, -pi/2 = top)."""
    s, c = np.sin(t), np.cos(t)
    low = np.clip(s, 0.0, None)
    high = np.clip(-s, 0.0, None)
    width = 1.0 - (1.0 - p.jaw) * low**2 - (1.0 - p.forehead) * high**2
    x = p.a * grow * c * width
    y = p.b * grow * s * np.where(s > 0, p.chin, 1.0)
    return np.stack([x, y], axis=1)


def _band(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """A closed polygon between two curves sampled at the same ``xs``."""
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bottom[::-1]], 1)])


# A shape: (points (N, 2) in face units, group, colour, line width or 0 for a filled polygon).
# Group 0 = head (outline, hair, ears, neck): weak yaw; group 1 = inner features: strong yaw.
_HEAD, _INNER = 0, 1


def _hair_shapes(p: _Identity):
    """(behind-the-head shapes, in-front shapes) of the hair style."""
    back, front = [], []
    h = p.volume
    col = p.hair
    if p.style == 0:  # bald: a fringe of hair at the sides only
        for sgn in (-1.0, 1.0):
            t = np.linspace(-0.55, 0.12, 10) if sgn > 0 else np.linspace(np.pi - 0.12, np.pi + 0.55, 10)
            outer = _outline(p, t, 1.0 + h * 0.6)
            inner = _outline(p, t[::-1], 0.93)
            front.append((np.concatenate([outer, inner]), _HEAD, col, 0.0))
        return back, front
    if p.style == 5:  # volume: a large mass behind the head
        back.append((_ellipse(0.0, -p.b * 0.35, p.a * (1.45 + h), p.b * (1.05 + h), 32), _HEAD, col, 0.0))
    if p.style == 4:  # long: falls behind the head down to the shoulders
        t = np.linspace(np.pi, 2 * np.pi, 20)
        arc = _outline(p, t, 1.0 + h)
        w = p.a * (1.12 + h)
        back.append((np.concatenate([[[-w, 0.5]], arc, [[w, 0.5]]]), _HEAD, col, 0.0))
    side = 0.1 if p.style == 3 else 0.22
    t = np.linspace(np.pi - side, 2 * np.pi + side, 26)
    outer = _outline(p, t, 1.0 + h * (1.8 if p.style == 5 else 1.0))
    outer[:, 1] -= h * 0.35
    inner = _outline(p, t[::-1], 0.94)
    line = np.full(len(t), p.hairline)
    if p.style == 2:  # side part: the hairline slopes
        line = p.hairline + p.part_tilt * inner[:, 0] * 0.5
    elif p.style == 3:  # fringe: low, ragged hairline
        line = p.hairline * 0.55 + 0.012 * np.where(np.arange(len(t)) % 2 == 0, 1.0, -1.0)
    inner[:, 1] = np.maximum(inner[:, 1], line)  # y is down: the hairline, or the face side below it
    front.append((np.concatenate([outer, inner]), _HEAD, col, 0.0))
    return back, front


def _head_shapes(p: _Identity, skin: np.ndarray) -> list:
    """Neck, ears and the face outline: the skin the other features sit on."""
    neck_top, neck_w = p.b * 0.5, p.a * 0.42
    neck = np.array([[-neck_w, neck_top], [neck_w, neck_top], [neck_w * 1.1, 0.55], [-neck_w * 1.1, 0.55]])
    shapes = [(neck, _HEAD, _colour(skin * 0.86), 0.0)]
    for sgn in (-1.0, 1.0):
        ex = sgn * p.a * 0.97
        shapes.append((_ellipse(ex, p.ear_y, p.ear_w, p.ear_h, 16), _HEAD, _colour(skin * 0.93), 0.0))
        shapes.append((_ellipse(ex + sgn * p.ear_w * 0.2, p.ear_y, p.ear_w * 0.45, p.ear_h * 0.6, 12), _HEAD,
                       _colour(skin * 0.78), 0.0))
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    shapes.append((_outline(p, t), _HEAD, p.skin, 0.0))
    return shapes


def _beard_colour(p: _Identity) -> tuple:
    """The hair colour, or for the bald the eyebrows', so a beard matches what hair they show."""
    return p.hair if p.style != 0 else p.brow


def _full_beard(p: _Identity) -> list:
    """A full beard covers the lower face below the cheekbones, under the nose (empty if none)."""
    if p.beard != 1:
        return []
    tb = np.linspace(-0.1, np.pi + 0.1, 24)
    low = _outline(p, tb, 1.03)
    top_y = p.nose_y + 0.015
    xs = np.linspace(-p.a, p.a, 9)
    top = np.stack([xs, top_y + (p.ear_y + 0.03 - top_y) * (xs / p.a) ** 2], 1)
    return [(np.concatenate([low, top]), _HEAD, _beard_colour(p), 0.0)]


def _nose_shapes(p: _Identity, skin: np.ndarray) -> list:
    """Nose: side shadow, tip, nostrils."""
    nw = p.nose_w
    ridge = np.array([[-nw * 0.3, p.eye_y + 0.02], [-nw * 0.12, p.eye_y + 0.02], [-nw * 0.5, p.nose_y],
                      [-nw * 0.8, p.nose_y]])
    shapes = [(ridge, _INNER, _colour(skin * 0.88), 0.0)]
    shapes.append((_ellipse(0.0, p.nose_y - nw * 0.1, nw * 0.75, nw * 0.42, 16), _INNER, _colour(skin * 0.92), 0.0))
    for sgn in (-1.0, 1.0):
        shapes.append((_ellipse(sgn * nw * 0.42, p.nose_y + nw * 0.15, nw * 0.22, nw * 0.13, 10), _INNER,
                       _colour(skin * 0.45), 0.0))
    return shapes


def _goatee(p: _Identity) -> list:
    """A goatee between mouth and chin (empty if none)."""
    if p.beard != 2:
        return []
    chin_y = p.b * p.chin
    gy = p.mouth_y + (chin_y - p.mouth_y) * 0.55
    return [(_ellipse(0.0, gy, p.mouth_w * 0.75, (chin_y - p.mouth_y) * 0.55, 20), _INNER, _beard_colour(p), 0.0)]


def _moustache(p: _Identity) -> list:
    """A moustache arched above the upper lip, drawn over the mouth (empty if none)."""
    if p.beard != 3:
        return []
    xs = np.linspace(-p.mouth_w * 1.1, p.mouth_w * 1.1, 11)
    arch = 1.0 - (xs / (p.mouth_w * 1.1)) ** 2
    base = p.mouth_y - p.lip_up - 0.004
    return [(_band(xs, base - 0.004 - 0.014 * arch, base + 0.006 * (1 - arch)), _INNER, _beard_colour(p), 0.0)]


def _mole(p: _Identity, skin: np.ndarray) -> list:
    """The person's mole, if they have one."""
    if p.mole is None:
        return []
    mx, my, mr = p.mole
    return [(_ellipse(mx, my, mr, mr, 10), _INNER, _colour(skin * 0.42), 0.0)]


def _glasses_shapes(p: _Identity) -> list:
    """Glasses: two lenses (superellipses: round or rectangular), optionally dark, with arms and a bridge."""
    if not p.glasses:
        return []
    shapes = []
    power = 2.0 if p.glasses == 1 else 6.0
    c, s = _ellipse(0.0, 0.0, 1.0, 1.0, 20).T
    sx = np.sign(c) * np.abs(c) ** (2.0 / power)
    sy = np.sign(s) * np.abs(s) ** (2.0 / power)
    rx, ry = p.eye_w * 1.55, max(p.eye_h * 2.2, p.eye_w * 1.0)
    for sgn in (-1.0, 1.0):
        lens = np.stack([sgn * p.eye_dx + rx * sx, p.eye_y + 0.004 + ry * sy], 1)
        if p.glasses_dark:
            shapes.append((lens, _INNER, (28, 30, 34), 0.0))
        shapes.append((np.concatenate([lens, lens[:1]]), _INNER, p.frame, p.frame_w))
        arm = np.array([[sgn * (p.eye_dx + rx), p.eye_y], [sgn * p.a * 0.98, p.eye_y - 0.005]])
        shapes.append((arm, _INNER, p.frame, p.frame_w))
    bridge = np.array([[-(p.eye_dx - rx), p.eye_y], [0.0, p.eye_y - 0.008], [p.eye_dx - rx, p.eye_y]])
    shapes.append((bridge, _INNER, p.frame, p.frame_w))
    return shapes


def _static_shapes(p: _Identity):
    """The parts of a face no image changes: (behind the shoulders, before the features, after them).

    Computed once per person and reused for all their images; the list order is the
    painting order, back to front.
    """
    skin = np.array(p.skin, np.float64)
    back, front_hair = _hair_shapes(p)
    before = [*_head_shapes(p, skin), *_full_beard(p), *_nose_shapes(p, skin), *_goatee(p)]
    after = [*_moustache(p), *_mole(p, skin), *front_hair, *_glasses_shapes(p)]
    return back, before, after


def _feature_shapes(p: _Identity, rng: np.random.Generator):
    """Eyes, eyebrows and mouth under this image's expression."""
    u = rng.uniform
    shapes = []
    blink = rng.random() < 0.06
    openness = u(0.08, 0.25) if blink else u(0.6, 1.12)
    gaze_x, gaze_y = u(-0.3, 0.3) * p.eye_w, u(-0.1, 0.1) * p.eye_h
    raise_ = u(-0.006, 0.018)
    smile = u(-0.4, 1.0)
    mouth_open = 0.0 if rng.random() < 0.65 else u(0.15, 1.0)
    lid = (48, 34, 30)
    for sgn in (-1.0, 1.0):
        cx, cy = sgn * p.eye_dx, p.eye_y
        tilt = -sgn * p.eye_tilt
        h = p.eye_h * openness
        if openness > 0.3:
            shapes.append((_ellipse(cx, cy, p.eye_w, h, 20, tilt), _INNER, (236, 234, 228), 0.0))
            ix, iy = cx + gaze_x, cy + gaze_y
            ry = min(p.iris_r, h * 0.95)
            shapes.append((_ellipse(ix, iy, p.iris_r, ry, 16), _INNER, p.iris, 0.0))
            shapes.append((_ellipse(ix, iy, p.iris_r * 0.45, min(p.iris_r * 0.45, ry), 10), _INNER, (14, 12, 12), 0.0))
        rim = _ellipse(cx, cy, p.eye_w * 1.02, h * 1.02, 20, tilt)
        top = np.concatenate([rim[10:], rim[:1]])  # upper lid: angles pi..2pi (y up is negative)
        shapes.append((top, _INNER, lid, 0.006 if openness > 0.3 else 0.008))
        # eyebrow: a band from the inner to the outer end, thick inside, thin outside
        k = np.linspace(0.0, 1.0, 9)
        inner_x, length = p.eye_dx - p.eye_w * 1.05, p.eye_w * 2.2 * p.brow_len
        xs = inner_x + k * length
        yc = cy - p.brow_gap - raise_ - k * length * math.tan(p.brow_angle) - p.brow_arch * np.sin(np.pi * k)
        half = p.brow_thick * (1.0 - 0.55 * k) * 0.5
        band = _band(xs, yc - half, yc + half)
        band[:, 0] *= sgn
        shapes.append((band, _INNER, p.brow, 0.0))
    # mouth: smile lifts the corners, opening parts the lips
    xs = np.linspace(-p.mouth_w, p.mouth_w, 15)
    q = xs / p.mouth_w
    bulge = np.sqrt(np.clip(1.0 - q**2, 0.0, None))
    mid = p.mouth_y + 0.022 * smile * (1.0 - q**2) - 0.01 * smile
    gap = mouth_open * (p.lip_up + p.lip_low) * 1.4
    top_in, bottom_in = mid - gap * 0.35 * bulge, mid + gap * 0.65 * bulge
    upper = _band(xs, top_in - p.lip_up * bulge - 0.002, top_in)
    lower = _band(xs, bottom_in, bottom_in + p.lip_low * bulge + 0.002)
    shapes.append((upper, _INNER, p.lip, 0.0))
    shapes.append((lower, _INNER, p.lip, 0.0))
    if mouth_open > 0.05:
        shapes.append((_band(xs, top_in, bottom_in), _INNER, (70, 24, 28), 0.0))
        tq = np.abs(q) < 0.7
        teeth_bottom = top_in + (bottom_in - top_in) * 0.35
        shapes.append((_band(xs[tq], top_in[tq], teeth_bottom[tq]), _INNER, (226, 222, 210), 0.0))
    else:
        shapes.append((np.stack([xs, mid], 1), _INNER, _colour(np.array(p.lip) * 0.6), 0.004))
    return shapes


# =========================================================================== rendering


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    kind = int(rng.integers(4))
    base = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == 0:  # flat
        return Image.new("RGB", (side, side), base)
    if kind == 1:  # linear gradient between two colours
        other = rng.integers(0, 256, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        g = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
        proj = (math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None]) * 0.5 + 0.5
        small = np.asarray(base, np.float32) * (1 - proj[..., None]) + other * proj[..., None]
        return Image.fromarray(small.astype(np.uint8)).resize((side, side), Image.BILINEAR)
    if kind == 2:  # smooth colour blobs
        n = int(rng.integers(2, 6))
        small = rng.integers(0, 256, (n, n, 3)).astype(np.uint8)
        return Image.fromarray(small).resize((side, side), Image.BICUBIC)
    img = Image.new("RGB", (side, side), base)  # random shapes
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
        w, h = rng.uniform(0.08, 0.6, 2) * side
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=col)
    return img


_GRIDS: dict[int, np.ndarray] = {}


def _grid(size: int) -> np.ndarray:
    """(2, S, S, 1) pixel-centre coordinates in [-0.5, 0.5]: x, then y."""
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        _GRIDS[size] = np.stack(np.meshgrid(c, c, indexing="xy"))[..., None]
    return _GRIDS[size]


class _Pose(NamedTuple):
    """One image's head pose: in-plane rotation, scale, translation, and yaw per shape group."""

    angle: float  # radians
    scale: float
    tx: float
    ty: float
    squash: np.ndarray  # horizontal factor per group (_HEAD, _INNER)
    shift: np.ndarray  # horizontal shift per group


def _draw_pose(rng: np.random.Generator) -> _Pose:
    """Draw the pose; yaw squashes and shifts the inner features more than the head outline."""
    u = rng.uniform
    angle = math.radians(u(-12.0, 12.0))
    scale = u(0.9, 1.1)
    tx, ty = u(-0.04, 0.04), u(-0.04, 0.04)
    yaw = u(-0.25, 0.25)
    squash = np.array([1.0 - 0.3 * abs(yaw), 1.0 - 0.8 * abs(yaw)])
    shift = np.array([0.04 * yaw, 0.13 * yaw])
    return _Pose(angle, scale, tx, ty, squash, shift)


def _image_shapes(p: _Identity, static: tuple[list, list, list], rng: np.random.Generator) -> list:
    """Every shape of one image, back to front: the identity's fixed ones, clothes, and this expression."""
    clothes = tuple(int(v) for v in rng.integers(0, 256, 3))
    shoulders = (_ellipse(0.0, p.b * p.chin + 0.33, p.a * 1.9, 0.3, 28), _HEAD, clothes, 0.0)
    back, before, after = static
    return [*back, shoulders, *before, *_feature_shapes(p, rng), *after]


def _to_pixels(shapes: list, pose: _Pose, side: int) -> list[float]:
    """All shape points, posed and scaled to the canvas, as one flat x, y list (one transform for all)."""
    pts = np.concatenate([s[0] for s in shapes])
    groups = np.concatenate([np.full(len(s[0]), s[1]) for s in shapes])
    x = pts[:, 0] * pose.squash[groups] + pose.shift[groups]
    y = pts[:, 1]
    ca, sa = math.cos(pose.angle) * pose.scale, math.sin(pose.angle) * pose.scale
    px = ((0.5 + pose.tx) + x * ca - y * sa) * side
    py = ((0.53 + pose.ty) + x * sa + y * ca) * side
    return np.stack([px, py], 1).ravel().tolist()


def _draw_shapes(img: Image.Image, shapes: list, pose: _Pose, side: int) -> None:
    """Paint the shapes in order: filled polygons, or lines whose width scales with the face."""
    flat = _to_pixels(shapes, pose, side)
    draw = ImageDraw.Draw(img)
    k = 0
    for pts_s, _, colour, width in shapes:
        n = 2 * len(pts_s)
        xy = flat[k:k + n]
        k += n
        if width:
            draw.line(xy, fill=colour, width=max(1, int(round(width * side * pose.scale))))
        else:
            draw.polygon(xy, fill=colour)


def _blur(img: Image.Image, rng: np.random.Generator, image_size: int) -> Image.Image:
    """A random focus blur, in proportion to the image size; too faint to see is skipped."""
    blur = rng.uniform(0.0, 0.9) * image_size / 112.0
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return img


def _light(img: Image.Image, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Lighting (directional gradient, brightness, contrast, colour cast), then sensor noise: uint8."""
    u = rng.uniform
    arr = np.asarray(img, dtype=np.float32)
    light_dir = u(0.0, 2 * np.pi)
    strength = u(0.0, 0.45)
    gx, gy = _grid(image_size)
    gain = 1.0 + strength * 2.0 * (math.cos(light_dir) * gx + math.sin(light_dir) * gy)
    cast = (1.0 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    contrast, brightness = u(0.72, 1.2), u(-30.0, 30.0)
    sigma = u(0.0, 7.0)
    noise = rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    out = (arr * gain * cast - 128.0) * np.float32(contrast) + np.float32(128.0 + brightness) + noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_face(
    identity: _Identity,
    static: tuple[list, list, list],
    rng: np.random.Generator,
    image_size: int,
) -> np.ndarray:
    """One image of ``identity`` under nuisance drawn from ``rng``: uint8 (S, S, 3), before JPEG.

    Draws happen in a fixed order (background, pose, clothes and expression, blur,
    lighting), which is what keeps a given seed's image byte-identical.
    """
    ss = 2 if image_size >= 64 else 4  # supersampling: the box-filter reduce antialiases every edge
    side = image_size * ss
    img = _background(rng, side)
    pose = _draw_pose(rng)
    _draw_shapes(img, _image_shapes(identity, static, rng), pose, side)
    img = _blur(img.reduce(ss), rng, image_size)
    return _light(img, rng, image_size)


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def identity_params(seed: int, split: int, person: int) -> _Identity:
    return _draw_identity(np.random.default_rng(np.random.SeedSequence([seed, split, person, _IDENTITY, 0])))


def face_image_bytes(identity: _Identity, static, seed: int, split: int, person: int, image: int,
                     image_size: int) -> bytes:
    """The JPEG of image ``image`` (0-based) of ``person``; depends on nothing else."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, person, _IMAGE, image]))
    arr = render_face(identity, static, rng, image_size)
    return _jpeg(arr, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))


# =========================================================================== LFW protocol


def _unrank_pairs(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``r`` in colex order of pairs (a < b) to (a, b): 0->(0,1), 1->(0,2), 2->(1,2), ..."""
    r = np.asarray(r, dtype=np.int64)
    b = ((1.0 + np.sqrt(1.0 + 8.0 * r)) // 2).astype(np.int64)
    b = np.where(b * (b - 1) // 2 > r, b - 1, b)  # float rounding guards
    b = np.where((b + 1) * b // 2 <= r, b + 1, b)
    return r - b * (b - 1) // 2, b


def _matched(people: np.ndarray, k: int, n: int, rng) -> list[tuple[int, int, int]]:
    """``n`` distinct (person, i, j), i < j 1-based, drawn uniformly from ``people``."""
    per = _pairs(k)
    r = rng.choice(len(people) * per, size=n, replace=False)
    i, j = _unrank_pairs(r % per)
    rows = zip(people[r // per].tolist(), (i + 1).tolist(), (j + 1).tolist())
    return sorted(rows)


def _mismatched(people: np.ndarray, k: int, n: int, rng) -> list[tuple[int, int, int, int]]:
    """``n`` distinct (person1, i, person2, j) with person1 < person2 (name order)."""
    people = np.sort(people)
    r = rng.choice(_pairs(len(people)) * k * k, size=n, replace=False)
    a, b = _unrank_pairs(r // (k * k))
    i, j = np.divmod(r % (k * k), k)
    rows = zip(people[a].tolist(), (i + 1).tolist(), people[b].tolist(), (j + 1).tolist())
    return sorted(rows)


def _protocol(names: list[str], k: int, seed: int, pairs_per_fold: int | None):
    """({file name: text} of pairs*.txt, people*.txt, lfw-names.txt; (pairs per fold, DevTrain, DevTest pairs))."""
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))  # person id -> position in name order
    sorted_names = [names[i] for i in order]
    P = len(names)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROTOCOL, P, k, 0]))

    folds = [np.sort(f) for f in np.array_split(rng.permutation(P), FOLDS)]  # in name-rank space
    fold_max = min(len(f) for f in folds) * _pairs(k)
    limit = min(MAX_PAIRS_PER_FOLD, fold_max)
    if pairs_per_fold is None:
        n = limit
    else:
        n = _as_int(pairs_per_fold, "--pairs-per-fold")
        if not 1 <= n <= fold_max:
            raise UserError(
                f"--pairs-per-fold must be between 1 and {fold_max} for {P} test identities with "
                f"{k} images each (the smallest fold has only {fold_max} distinct matched pairs); got {n}."
            )
    perm = rng.permutation(P)
    n_dev_train = min(max(int(round(P * DEV_TRAIN_SHARE)), 2), P - 2)
    dev = {"Train": np.sort(perm[:n_dev_train]), "Test": np.sort(perm[n_dev_train:])}
    dev_cap = {"Train": MAX_DEV_TRAIN_PAIRS, "Test": MAX_DEV_TEST_PAIRS}

    def pair_lines(people: np.ndarray, count: int) -> list[str]:
        same = [f"{sorted_names[p]}\t{i}\t{j}\n" for p, i, j in _matched(people, k, count, rng)]
        diff = [f"{sorted_names[p]}\t{i}\t{sorted_names[q]}\t{j}\n" for p, i, q, j in _mismatched(people, k, count, rng)]
        return same + diff

    def people_lines(people: np.ndarray) -> list[str]:
        return [f"{sorted_names[p]}\t{k}\n" for p in people]

    texts = {}
    lines = [f"{FOLDS}\t{n}\n"]
    for f in folds:
        lines += pair_lines(f, n)
    texts["pairs.txt"] = "".join(lines)
    counts = {}
    for part, people in dev.items():
        m = min(dev_cap[part], len(people) * _pairs(k))
        counts[part] = m
        texts[f"pairsDev{part}.txt"] = "".join([f"{m}\n", *pair_lines(people, m)])
        texts[f"peopleDev{part}.txt"] = "".join([f"{len(people)}\n", *people_lines(people)])
    lines = [f"{FOLDS}\n"]
    for f in folds:
        lines += [f"{len(f)}\n", *people_lines(f)]
    texts["people.txt"] = "".join(lines)
    texts["lfw-names.txt"] = "".join(people_lines(np.arange(P)))
    return texts, (n, counts["Train"], counts["Test"])


# =========================================================================== writing


def _check_out_dir(out: Path) -> None:
    """Refuse a file, and refuse to overwrite data sets facecli did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory.", hint="Choose a new or existing folder for OUT_DIR.")
    if (out / MARKER).is_file() or (out / PARTIAL_MARKER).is_file():
        return
    for sub in (CASIA_DIR, LFW_DIR):
        d = out / sub
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise UserError(
                f"{d}: already exists and was not written by 'facecli synth' (no {MARKER} beside it); "
                f"refusing to overwrite what may be a real data set.",
                hint="Choose another OUT_DIR, or remove that folder if it is a synthetic set.",
            )


def _prune(root: Path, expected: dict[str, set[str]], dir_re: re.Pattern, file_re) -> int:
    """Delete files of an earlier synthetic set that the new one does not have.

    Only names the generator itself writes are touched (``dir_re`` folders, and inside
    them files matched by ``file_re(folder)``); anything else is left alone.
    """
    removed = 0
    if not root.is_dir():
        return 0
    for d in sorted(root.iterdir()):
        if not d.is_dir() or not dir_re.match(d.name):
            continue
        keep = expected.get(d.name, set())
        pattern = file_re(d.name)
        for f in sorted(d.iterdir()):
            if f.is_file() and pattern.match(f.name) and f.name not in keep:
                f.unlink()
                removed += 1
        if d.name not in expected and not any(d.iterdir()):
            d.rmdir()
    return removed


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e}).", hint="Check free disk space and permissions.") from e


def _checked_args(identities, test_identities, images_per_identity, image_size, seed, pairs_per_fold):
    """The integer arguments, validated before anything touches the disk: (identities, test, k, size, seed)."""
    identities = _at_least(identities, 2, "--identities", "a classifier needs two classes")
    if identities > MAX_IDENTITIES:
        raise UserError(f"--identities must be at most {MAX_IDENTITIES} (7-digit folder names); got {identities}.")
    test_identities = _at_least(
        test_identities, MIN_TEST_IDENTITIES, "--test-identities",
        f"LFW's View 2 splits the test people into {FOLDS} disjoint folds of at least two people, "
        f"and View 1 into disjoint DevTrain and DevTest people",
    )
    k = _at_least(images_per_identity, 2, "--images-per-identity", "matched pairs need two images of a person")
    image_size = _at_least(image_size, 16, "--image-size", "smaller faces lose their features")
    seed = _at_least(seed, 0, "--seed", "seeds are non-negative integers")
    if pairs_per_fold is not None:
        _at_least(pairs_per_fold, 1, "--pairs-per-fold", "each fold needs pairs")
    return identities, test_identities, k, image_size, seed


@dataclass(frozen=True)
class _Plan:
    """Everything a synthetic set is, decided (and validated) before its first byte is written."""

    out: Path
    identities: int
    test_identities: int
    k: int  # images per identity
    image_size: int
    seed: int
    ids: list  # CASIA folder names of the training people
    names: list  # LFW names of the test people
    texts: dict  # {protocol file name: text}
    counts: tuple  # (pairs per fold, DevTrain pairs, DevTest pairs)

    @property
    def train_dir(self) -> Path:
        return self.out / CASIA_DIR

    @property
    def lfw_dir(self) -> Path:
        return self.out / LFW_DIR

    @property
    def img_dir(self) -> Path:
        return self.lfw_dir / LFW_IMAGES

    def casia_file(self, _folder: str, n: int) -> str:
        """001.jpg for image 0: 1-based, at least 3 digits, as in CASIA-WebFace."""
        return f"{n + 1:0{max(3, len(str(self.k)))}d}.jpg"

    def lfw_file(self, folder: str, n: int) -> str:
        """Name_0001.jpg for image 0: 1-based, at least 4 digits, as in LFW."""
        return f"{folder}_{n + 1:0{max(4, len(str(self.k)))}d}.jpg"

    def marker_bytes(self) -> bytes:
        """The JSON that says what wrote the set and how; written first as partial, last as complete."""
        n_fold, n_dev_train, n_dev_test = self.counts
        marker = {
            "generator": "facecli synth",
            "format": 1,
            "seed": self.seed,
            "identities": self.identities,
            "test_identities": self.test_identities,
            "images_per_identity": self.k,
            "image_size": self.image_size,
            "pairs_per_fold": n_fold,
            "dev_train_pairs": n_dev_train,
            "dev_test_pairs": n_dev_test,
            "train_dir": CASIA_DIR,
            "lfw_dir": LFW_DIR,
        }
        return (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode("ascii")


def _plan(out_dir, identities, test_identities, images_per_identity, image_size, seed, pairs_per_fold) -> _Plan:
    """Validate every argument and draw names and protocol first, so a bad request writes nothing."""
    identities, test_identities, k, image_size, seed = _checked_args(
        identities, test_identities, images_per_identity, image_size, seed, pairs_per_fold
    )
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    names = lfw_names(test_identities, seed)
    texts, counts = _protocol(names, k, seed, pairs_per_fold)  # validates --pairs-per-fold
    return _Plan(
        out=out, identities=identities, test_identities=test_identities, k=k, image_size=image_size,
        seed=seed, ids=casia_ids(identities, seed), names=names, texts=texts, counts=counts,
    )


def _prepare_out_dir(plan: _Plan, marker_bytes: bytes) -> int:
    """Claim OUT_DIR as an incomplete set and prune an earlier set's extra files; returns how many went."""
    out = plan.out
    casia_files = {i: {plan.casia_file(i, n) for n in range(plan.k)} for i in plan.ids}
    lfw_files = {nm: {plan.lfw_file(nm, n) for n in range(plan.k)} for nm in plan.names}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / PARTIAL_MARKER, marker_bytes)
        (out / MARKER).unlink(missing_ok=True)  # until the new set is complete, no marker claims it is
        removed = _prune(plan.train_dir, casia_files, _ID_DIR_RE, lambda _: _ID_FILE_RE)
        removed += _prune(plan.img_dir, lfw_files, _NAME_RE, lambda nm: re.compile(rf"^{re.escape(nm)}_\d{{4,}}\.jpg$"))
        plan.img_dir.mkdir(parents=True, exist_ok=True)
        plan.train_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot prepare the output folder ({e.strerror or e}).",
                        hint="Check the path and its permissions.") from e
    return removed


def _write_people(
    plan: _Plan,
    split: int,
    folders: list[str],
    root: Path,
    file_name: Callable[[str, int], str],
    progress: Progress | None,
) -> None:
    """Render and write every image of every person of one split, one folder per person."""
    for person, folder in enumerate(folders):
        ident = identity_params(plan.seed, split, person)
        static = _static_shapes(ident)
        d = root / folder
        try:
            d.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"{d}: cannot create ({e.strerror or e}).",
                            hint="Check free disk space and permissions.") from e
        for n in range(plan.k):
            data = face_image_bytes(ident, static, plan.seed, split, person, n, plan.image_size)
            _write(d / file_name(folder, n), data)
            if progress is not None:
                progress(1)


def _write_protocol(lfw_dir: Path, texts: dict) -> list[Path]:
    """Write the pairs/people/names files beside lfw_funneled/, in name order; returns their paths."""
    written = []
    for fname in sorted(texts):
        _write(lfw_dir / fname, texts[fname].encode("ascii"))
        written.append(lfw_dir / fname)
    return written


def _mark_complete(out: Path, marker_bytes: bytes) -> None:
    """Swap the partial marker for the final one: only now does the set claim to be whole."""
    _write(out / MARKER, marker_bytes)
    try:
        (out / PARTIAL_MARKER).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"{out / PARTIAL_MARKER}: cannot remove ({e.strerror or e}).",
                        hint="Check the folder's permissions.") from e


def _summary(plan: _Plan, written: list[Path], removed: int) -> SynthSummary:
    """What was written, in the paths and counts the CLI reports and callers read back."""
    n_fold, n_dev_train, n_dev_test = plan.counts
    lfw_dir = plan.lfw_dir
    return SynthSummary(
        out_dir=plan.out, train_dir=plan.train_dir, lfw_dir=lfw_dir, lfw_images_dir=plan.img_dir,
        pairs_file=lfw_dir / "pairs.txt", dev_train_pairs_file=lfw_dir / "pairsDevTrain.txt",
        dev_test_pairs_file=lfw_dir / "pairsDevTest.txt", protocol_files=tuple(written),
        marker_file=plan.out / MARKER, train_identities=plan.identities, train_images=plan.identities * plan.k,
        test_identities=plan.test_identities, test_images=plan.test_identities * plan.k, pairs_per_fold=n_fold,
        dev_train_pairs=n_dev_train, dev_test_pairs=n_dev_test, image_size=plan.image_size, seed=plan.seed,
        removed_stale=removed,
    )


def generate_synthetic_set(
    out_dir,
    identities: int = 200,
    test_identities: int = 60,
    images_per_identity: int = 20,
    image_size: int = 112,
    seed: int = 0,
    pairs_per_fold: int | None = None,
    progress: Progress | None = None,
) -> SynthSummary:
    """Write the synthetic CASIA-WebFace training set and LFW test set under ``out_dir``.

    ``identities`` training people and ``test_identities`` test people, each with
    ``images_per_identity`` JPEGs of ``image_size`` pixels square. ``pairs_per_fold``:
    matched (and as many mismatched) pairs per View 2 fold; default as many as the
    smallest fold allows without repeating a pair, at most LFW's 300. ``progress`` is
    called with 1 after each image written. Re-running over a set this function wrote
    rewrites it (byte-identical for the same arguments) and deletes files of the
    earlier set that the new one lacks.
    """
    plan = _plan(out_dir, identities, test_identities, images_per_identity, image_size, seed, pairs_per_fold)
    marker_bytes = plan.marker_bytes()
    removed = _prepare_out_dir(plan, marker_bytes)
    _write_people(plan, _TRAIN, plan.ids, plan.train_dir, plan.casia_file, progress)
    _write_people(plan, _TEST, plan.names, plan.img_dir, plan.lfw_file, progress)
    written = _write_protocol(plan.lfw_dir, plan.texts)
    _mark_complete(plan.out, marker_bytes)
    return _summary(plan, written, removed)
