"""Margin heads and triplet loss against values worked out by hand with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from facecli.errors import UserError
from facecli.losses import HEADS, MarginHead, build_head, semihard_triplet_loss

# Three classes and three embeddings in 2-D, given by their angles; norms differ on purpose
# so the heads must normalise both sides.
CLASS_ANGLES = [0.0, 1.0, 2.5]
CLASS_NORMS = [2.0, 0.5, 3.0]
EMB_ANGLES = [0.3, -0.6, 1.2]
EMB_NORMS = [1.0, 4.0, 0.2]
LABELS = [0, 2, 1]  # target angles: 0.3, 3.1 (beyond pi - 0.5), 0.2


def _vec(angles, norms):
    return torch.tensor([[r * math.cos(a), r * math.sin(a)] for a, r in zip(angles, norms)], dtype=torch.float32)


def _cos_table():
    return [[math.cos(e - c) for c in CLASS_ANGLES] for e in EMB_ANGLES]


def _head(name, **hp):
    head = build_head(name, 2, 3, **hp)
    with torch.no_grad():
        head.weight.copy_(_vec(CLASS_ANGLES, CLASS_NORMS))
    return head


def _inputs():
    return _vec(EMB_ANGLES, EMB_NORMS), torch.tensor(LABELS)


def _expected(target_fn, s, nontarget_fn=None):
    """Hand formula: s * target_fn(cos_y) on the target column, s * nontarget_fn(cos_j, row) elsewhere."""
    rows = []
    for i, row in enumerate(_cos_table()):
        y = LABELS[i]
        rows.append(
            [
                s * target_fn(c) if j == y else s * (nontarget_fn(c, row[y]) if nontarget_fn else c)
                for j, c in enumerate(row)
            ]
        )
    return torch.tensor(rows, dtype=torch.float32)


def _norms_kw(name, rows, dtype=torch.float32):
    """``norms=`` for the heads that read the embedding norm (AdaFace, MagFace), else nothing."""
    if not HEADS[name].needs_embedding_norm:
        return {}
    return {"norms": torch.linspace(5.0, 60.0, rows, dtype=dtype)}


def _close(actual, expected, atol=1e-4):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_registry_and_defaults():
    assert set(HEADS) == {"cosface", "arcface", "sphereface", "curricularface", "adaface", "magface", "elasticface"}
    for name, cls in HEADS.items():
        assert cls.name == name and issubclass(cls, MarginHead)
    assert build_head("cosface", 4, 5).hparams() == {"scale": 64.0, "margin": 0.35}
    assert build_head("arcface", 4, 5).hparams() == {"scale": 64.0, "margin": 0.5}
    assert build_head("sphereface", 4, 5).hparams() == {"scale": 30.0, "margin": 1.5}
    assert build_head("curricularface", 4, 5).hparams() == {"scale": 64.0, "margin": 0.5, "momentum": 0.01}
    assert build_head("adaface", 4, 5).hparams() == {"scale": 64.0, "margin": 0.4, "h": 0.333, "t_alpha": 0.01}
    assert build_head("magface", 4, 5).hparams() == {"scale": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0}
    assert build_head("elasticface", 4, 5).hparams() == {"scale": 64.0, "margin": 0.5, "margin_std": 0.05, "sort": 0.0}
    # None means default; names are case-insensitive
    assert build_head("ArcFace", 4, 5, scale=None, margin=0.3, momentum=None).hparams() == {"scale": 64.0, "margin": 0.3}


def test_weight_parameter_init():
    torch.manual_seed(0)
    head = build_head("arcface", 64, 300)
    assert isinstance(head.weight, torch.nn.Parameter)
    assert head.weight.shape == (300, 64)
    assert abs(head.weight.std().item() - 0.01) < 1e-3
    assert abs(head.weight.mean().item()) < 1e-3


def test_cosine_is_clamped_float32():
    head = _head("cosface")
    x, _ = _inputs()
    cos = head.cosine(x.double())
    assert cos.dtype == torch.float32
    _close(cos, torch.tensor(_cos_table(), dtype=torch.float32), atol=1e-6)
    same = head.cosine(head.weight.detach() * 7.0)  # cos exactly +1 on the diagonal, maybe 1 + ulp before clamp
    assert same.max().item() <= 1.0 and same.min().item() >= -1.0


def test_cosface_values():
    x, y = _inputs()
    head = _head("cosface", scale=10.0, margin=0.35)
    _close(head(x, y), _expected(lambda c: c - 0.35, 10.0))


def test_arcface_both_branches():
    x, y = _inputs()
    m, s = 0.5, 16.0
    head = _head("arcface", scale=s, margin=m)
    # Row 1 has theta_y = 3.1 > pi - m: the fallback branch.
    assert math.cos(3.1) <= math.cos(math.pi - m) < math.cos(0.3)

    def target(c):
        theta = math.acos(c)
        return math.cos(theta + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)

    expected = _expected(target, s)
    _close(head(x, y), expected)
    assert abs(expected[1, 2].item() - s * (math.cos(3.1) - m * math.sin(m))) < 1e-4
    assert abs(expected[0, 0].item() - s * math.cos(0.8)) < 1e-4


def test_sphereface_k0_and_k1():
    x, y = _inputs()
    m, s = 1.5, 30.0
    head = _head("sphereface", scale=s, margin=m)

    def psi(c):
        theta = math.acos(c)
        k = math.floor(m * theta / math.pi)
        return (-1) ** k * math.cos(m * theta) - 2 * k

    # theta_y = 0.3 -> k = 0, theta_y = 3.1 -> k = 1
    assert math.floor(m * 0.3 / math.pi) == 0 and math.floor(m * 3.1 / math.pi) == 1
    expected = _expected(psi, s)
    assert abs(expected[1, 2].item() - s * (-math.cos(4.65) - 2.0)) < 1e-4
    _close(head(x, y), expected)
    # m = 1 is the plain normalised softmax
    _close(_head("sphereface", scale=s, margin=1.0)(x, y), _expected(lambda c: c, s))


def test_sphereface_psi_is_continuous_and_decreasing():
    head = build_head("sphereface", 2, 3, margin=2.7)
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    psi = head._target(torch.cos(theta))
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-6).all()  # monotone non-increasing as theta grows
    assert steps.abs().max().item() < 2.7 * 2 * (math.pi / 2000)  # no jumps at the k boundaries


def _curricular_expected(m, s, t):
    def target(c):
        return math.cos(math.acos(c) + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)

    def nontarget(c, cy):
        cos_m = math.cos(math.acos(cy) + m)  # even where the fallback target applies
        return c * (t + c) if c > cos_m else c

    return _expected(target, s, nontarget)


def test_curricularface_t_update_and_hard_examples():
    x, y = _inputs()
    m, s, mom = 0.5, 10.0, 0.5
    head = _head("curricularface", scale=s, margin=m, momentum=mom)
    table = _cos_table()
    cos_y = [table[i][LABELS[i]] for i in range(3)]
    mean_y = sum(cos_y) / 3
    # Row 0: class 1 is hard (cos 0.765 > cos(0.8)), class 2 is not (-0.589).
    assert table[0][1] > math.cos(0.3 + m) > table[0][2]
    # Row 1 (fallback target): cos_m = cos(3.6) still decides hardness.
    assert table[1][1] > math.cos(3.1 + m)

    assert "t" in head.state_dict() and head.t.dtype == torch.float32 and head.t.item() == 0.0
    head.train()
    first = head(x, y)
    t1 = mom * mean_y
    assert abs(head.t.item() - t1) < 1e-6
    _close(first, _curricular_expected(m, s, t1))  # t is updated before it is used

    second = head(x, y)
    t2 = mom * mean_y + (1 - mom) * t1
    assert abs(head.t.item() - t2) < 1e-6
    _close(second, _curricular_expected(m, s, t2))
    assert not torch.allclose(first, second)

    head.eval()
    third = head(x, y)
    assert abs(head.t.item() - t2) < 1e-6  # eval leaves t alone but uses it
    _close(third, second)

    clone = _head("curricularface", scale=s, margin=m, momentum=mom).eval()
    clone.load_state_dict(head.state_dict())
    _close(clone(x, y), second)


def test_curricularface_t_update_has_no_grad():
    head = build_head("curricularface", 8, 5, momentum=0.1).train()
    x = torch.randn(6, 8, requires_grad=True)
    head(x, torch.randint(0, 5, (6,))).sum().backward()
    assert not head.t.requires_grad and head.t.grad_fn is None


@pytest.mark.parametrize("name", ["cosface", "arcface", "sphereface"])
def test_train_equals_eval_for_stateless_heads(name):
    torch.manual_seed(1)
    head = build_head(name, 16, 10)
    x, y = torch.randn(7, 16), torch.randint(0, 10, (7,))
    head.train()
    a = head(x, y)
    head.eval()
    torch.testing.assert_close(a, head(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_label_minus_one_is_plain_scaled_cos(name):
    torch.manual_seed(2)
    head = build_head(name, 8, 6).eval()
    cos = head.cosine(torch.randn(5, 8))
    labels = torch.tensor([3, -1, 0, -1, 5])
    kw = _norms_kw(name, 5)
    out = head.logits_from_cos(cos, labels, target_cos=cos[:, 2], **kw)  # arbitrary outside cos_y, used by curricular only
    if name != "curricularface":
        torch.testing.assert_close(out[[1, 3]], head.scale * cos[[1, 3]], rtol=0, atol=1e-6)
        torch.testing.assert_close(head.logits_from_cos(cos, labels, **kw), out, rtol=0, atol=0)
    full = head.logits_from_cos(cos, labels.clamp_min(0), **kw)
    torch.testing.assert_close(out[[0, 2, 4]], full[[0, 2, 4]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_class_sharded_logits_match_full(name):
    """Two processes each holding half of W produce the full logits (and the same t)."""
    torch.manual_seed(3)
    full = build_head(name, 8, 10)
    shards = [build_head(name, 8, 5), build_head(name, 8, 5)]
    with torch.no_grad():
        shards[0].weight.copy_(full.weight[:5])
        shards[1].weight.copy_(full.weight[5:])
    x, y = torch.randn(9, 8), torch.randint(0, 10, (9,))
    for step in range(2):  # second step uses the updated t (curricularface)
        expected = full(x, y)
        cos_full = full.cosine(x)
        cos_y = cos_full.gather(1, y[:, None]).squeeze(1)
        parts = []
        for k, shard in enumerate(shards):
            local = y - 5 * k
            local = torch.where((local >= 0) & (local < 5), local, torch.full_like(local, -1))
            norms = {"norms": x.norm(dim=1)} if shard.needs_embedding_norm else {}
            parts.append(shard.logits_from_cos(shard.cosine(x), local, target_cos=cos_y, **norms))
        torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=0, atol=1e-4)
        if name == "curricularface":
            assert full.t.item() != 0.0
            for shard in shards:
                torch.testing.assert_close(shard.t, full.t)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_autocast_bf16_gives_float32_logits(name):
    torch.manual_seed(4)
    head = build_head(name, 32, 20).eval()
    x, y = torch.randn(8, 32), torch.randint(0, 20, (8,))
    reference = head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_input = head(x, y)
        bf16_input = head(x.to(torch.bfloat16), y)
    assert same_input.dtype == torch.float32 and bf16_input.dtype == torch.float32
    torch.testing.assert_close(same_input, reference, rtol=0, atol=1e-5)
    tol = 1e-2 * reference.abs().max().item()
    assert (bf16_input - reference).abs().max().item() <= tol


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradients_finite_random_and_at_the_poles(name):
    torch.manual_seed(5)
    head = build_head(name, 4, 3).train()
    w = head.weight.detach().clone()
    rand = torch.randn(4, 4)
    pole = torch.stack([w[0] * 3.0, -w[1] * 2.0, w[2] * (1 - 1e-7), -w[0] + 1e-4 * torch.randn(4)])
    for x, y in ((rand, torch.tensor([0, 1, 2, 0])), (pole, torch.tensor([0, 1, 2, 0])), (pole, torch.tensor([1, 0, 2, 2]))):
        head.zero_grad()
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(head(x, y), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradcheck_logits_from_cos(name):
    """Analytic gradients agree with finite differences (float64, away from branch points)."""
    torch.manual_seed(6)
    head = build_head(name, 4, 5, scale=2.0).eval()
    if name == "curricularface":
        head.t.fill_(0.3)
    cos = (torch.rand(4, 5, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 4])
    target = torch.rand(4, dtype=torch.float64) * 1.8 - 0.9
    if not head.needs_embedding_norm:
        assert torch.autograd.gradcheck(lambda c: head.logits_from_cos(c, labels, target_cos=target), (cos,))
        return
    # inside MagFace's [l_a, u_a] and on both sides of AdaFace's running mean (20)
    norms = torch.tensor([15.0, 30.0, 60.0, 95.0], dtype=torch.float64)
    if name == "adaface":  # AdaFace detaches the norms (as released): cos alone
        assert torch.autograd.gradcheck(lambda c: head.logits_from_cos(c, labels, target_cos=target, norms=norms), (cos,))
        return
    assert torch.autograd.gradcheck(  # MagFace: the gradient reaches the norms through the margin
        lambda c, a: head.logits_from_cos(c, labels, target_cos=target, norms=a), (cos, norms.requires_grad_(True))
    )


@pytest.mark.parametrize(
    "name, hp, fragment",
    [
        ("nosuchface", {}, "arcface"),
        ("arcface", {"scale": 0}, "scale"),
        ("arcface", {"scale": -3.0}, "scale"),
        ("arcface", {"scale": float("nan")}, "scale"),
        ("cosface", {"margin": 1.2}, "margin"),
        ("cosface", {"margin": -0.1}, "margin"),
        ("arcface", {"margin": math.pi}, "margin"),
        ("curricularface", {"margin": 3.2}, "margin"),
        ("sphereface", {"margin": 0.9}, "margin"),
        ("curricularface", {"momentum": 1.5}, "momentum"),
        ("curricularface", {"momentum": -0.1}, "momentum"),
        ("arcface", {"momentum": 0.1}, "momentum"),
        ("cosface", {"margin": "wide"}, "margin"),
        ("cosface", {"temperature": 1.0}, "temperature"),
    ],
)
def test_build_head_errors(name, hp, fragment):
    with pytest.raises(UserError) as info:
        build_head(name, 8, 4, **hp)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_build_head_edge_values_accepted():
    assert build_head("cosface", 2, 2, margin=0.0).margin == 0.0
    assert build_head("cosface", 2, 2, margin=1.0).margin == 1.0
    assert build_head("sphereface", 2, 2, margin=1.0).margin == 1.0
    assert build_head("curricularface", 2, 2, momentum=1.0).momentum == 1.0
    with pytest.raises(UserError):
        build_head("arcface", 0, 4)


# ---------------------------------------------------------------- triplet loss


def _d(delta):
    """Squared distance between unit vectors at angular distance ``delta``."""
    return 2.0 - 2.0 * math.cos(delta)


def test_triplet_hand_example_semihard_and_fallback():
    angles = [0.0, 0.5, 0.3, 1.6, 1.1]
    labels = torch.tensor([0, 0, 1, 1, 2])  # point 4 is a singleton: only a negative
    x = _vec(angles, [1.0, 2.0, 0.5, 3.0, 1.5]).requires_grad_(True)
    m = 0.2
    terms = [
        _d(0.5) - _d(1.1) + m,  # (0,1): negatives at 0.3, 1.6, 1.1 -> closest beyond 0.5 is point 4
        _d(0.5) - _d(0.6) + m,  # (1,0): negatives at 0.2, 1.1, 0.6 -> point 4, not the hardest (0.2)
        _d(1.3) - _d(0.8) + m,  # (2,3): negatives at 0.3, 0.2, 0.8 all closer -> farthest, point 4
        _d(1.3) - _d(1.6) + m,  # (3,2): negatives at 1.6, 1.1, 0.5 -> point 0
    ]
    expected = sum(max(t, 0.0) for t in terms) / 4
    loss = semihard_triplet_loss(x, labels, margin=m)
    assert loss.dim() == 0
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_triplet_semihard_is_strict():
    # Exact ties: for every pair one negative is exactly as far as the positive (d = 2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Strict choice skips the tied negative and takes the one at d = 4: every term is 0.
    assert semihard_triplet_loss(x, labels, margin=0.2).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5], [], [7]])
def test_triplet_without_pairs_is_zero(labels):
    x = torch.randn(len(labels), 3, requires_grad=True)
    loss = semihard_triplet_loss(x, torch.tensor(labels, dtype=torch.long))
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and (x.grad == 0).all()


def _brute_force_triplet(x, labels, margin):
    x = torch.nn.functional.normalize(x, dim=1)
    n = len(labels)
    d = [[((x[i] - x[j]) ** 2).sum() for j in range(n)] for i in range(n)]
    terms = []
    for a in range(n):
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        if not negatives:
            continue
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            beyond = [k for k in negatives if d[a][k].item() > d[a][p].item()]
            pick = min(beyond, key=lambda k: d[a][k].item()) if beyond else max(negatives, key=lambda k: d[a][k].item())
            terms.append(torch.clamp(d[a][p] - d[a][pick] + margin, min=0))
    return torch.stack(terms).mean() if terms else x.sum() * 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(18, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (18,), generator=g).tolist()
    margin = 0.3 + 0.2 * seed
    a = x.clone().float().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    loss = semihard_triplet_loss(a, torch.tensor(labels), margin=margin)
    reference = _brute_force_triplet(b, labels, margin)
    assert abs(loss.item() - reference.item()) < 1e-5
    loss.backward()
    reference.backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5)


def test_triplet_autocast_and_bad_margin():
    torch.manual_seed(7)
    x, labels = torch.randn(12, 8), torch.randint(0, 3, (12,))
    reference = semihard_triplet_loss(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = semihard_triplet_loss(x, labels)
    assert inside.dtype == torch.float32
    assert abs(inside.item() - reference.item()) < 1e-6
    with pytest.raises(UserError):
        semihard_triplet_loss(x, labels, margin=-0.1)
