"""linalg: the SVD of ΔW from its factors matches the dense fp64 SVD (σ to ≤ 1e-5·σ₀), for every layer shape."""

import pytest
import torch

from lora_ops import linalg
from lora_ops.errors import LoraValueError
from lora_ops.lora import LoRALayer, LycorisLayer

REL = 1e-5  # |σ_ours − σ_dense| ≤ REL·σ₀ (absolute error relative to the spectral norm)


def _ill(rows: int, cols: int, gen: torch.Generator, cond: float = 1e6) -> torch.Tensor:
    """A random rows×cols matrix with singular values spread log-uniformly over ``cond``."""
    m = min(rows, cols)
    q1, _ = torch.linalg.qr(torch.randn(rows, m, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(cols, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    return ((q1 * s) @ q2.T).float()


def make_layer(kind: str, out: int, inp: int, r: int, *, ill: bool = False, seed: int = 0, alpha=3.0) -> LoRALayer:
    gen = torch.Generator().manual_seed(seed)
    rand = (lambda a, b: _ill(a, b, gen)) if ill else (lambda a, b: torch.randn(a, b, generator=gen))
    if kind == "linear":
        return LoRALayer(down=rand(r, inp), up=rand(out, r), alpha=alpha)
    if kind == "conv1x1":
        return LoRALayer(down=rand(r, inp)[:, :, None, None], up=rand(out, r)[:, :, None, None], alpha=alpha)
    if kind == "conv3x3":
        return LoRALayer(down=rand(r, inp * 9).reshape(r, inp, 3, 3), up=rand(out, r)[:, :, None, None], alpha=alpha)
    if kind == "tucker":
        mid = rand(r, r * 9).reshape(r, r, 3, 3)
        return LoRALayer(down=rand(r, inp)[:, :, None, None], up=rand(out, r)[:, :, None, None], alpha=alpha, mid=mid)
    raise AssertionError(kind)


def dense_sv(layer) -> torch.Tensor:
    return torch.linalg.svdvals(layer.delta(torch.float64).flatten(1))


def assert_sv_match(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    ours = ours.double()
    assert ours.numel() <= ref.numel()
    padded = torch.cat([ours, ref.new_zeros(ref.numel() - ours.numel())])  # the rest of ΔW's spectrum is 0
    scale = float(ref[0]) if float(ref[0]) > 0 else 1.0
    err = float((padded - ref).abs().max()) / scale
    assert err <= rel, f"σ error {err:.2e} > {rel:.0e}"


KINDS = ["linear", "conv1x1", "conv3x3", "tucker"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ill", [False, True], ids=["random", "ill"])
@pytest.mark.parametrize("dims", [(40, 24, 8), (12, 30, 16), (20, 3, 6)], ids=["r<d,k", "r>out", "r>in"])
def test_layer_svd_matches_dense(kind, ill, dims):
    out, inp, r = dims
    layer = make_layer(kind, out, inp, r, ill=ill, seed=hash((kind, ill, dims)) % 1000)
    svd = linalg.layer_svd(layer)
    ref = dense_sv(layer)
    assert svd.S.dtype == torch.float32
    assert svd.rank == min(r, out, svd.Vh.shape[1])  # every singular value there is
    assert_sv_match(svd.S, ref)
    assert svd.shape == tuple(layer.delta().shape)
    # the factors themselves: orthonormal, and they rebuild ΔW
    m = svd.rank
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(m), atol=1e-4)
    assert torch.allclose(svd.Vh @ svd.Vh.T, torch.eye(m), atol=1e-4)
    dense = layer.delta(torch.float64)
    assert (svd.dense().double() - dense).norm() <= 1e-5 * dense.norm()


@pytest.mark.parametrize("kind", KINDS)
def test_fp64_option_is_tighter(kind):
    layer = make_layer(kind, 30, 20, 12, ill=True, seed=3)
    svd = linalg.layer_svd(layer, torch.float64)
    assert svd.S.dtype == torch.float64
    assert_sv_match(svd.S, dense_sv(layer), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_layer_has_zero_spectrum(kind):
    layer = make_layer(kind, 16, 10, 4)
    zero = LoRALayer(down=layer.down, up=torch.zeros_like(layer.up), alpha=layer.alpha, mid=layer.mid)
    svd = linalg.layer_svd(zero)
    assert torch.equal(svd.S, torch.zeros_like(svd.S))
    assert svd.dense().abs().max() == 0


def test_alpha_none_and_scale():
    layer = make_layer("linear", 20, 10, 4, alpha=None)
    assert_sv_match(linalg.layer_svd(layer).S, dense_sv(layer))
    half = LoRALayer(down=layer.down, up=layer.up, alpha=2.0)  # scale 0.5
    assert torch.allclose(linalg.layer_svd(half).S, 0.5 * linalg.layer_svd(layer).S, rtol=1e-5)


def _loha(out: int, inp: int, r: int, seed: int) -> LycorisLayer:
    g = torch.Generator().manual_seed(seed)
    parts = {n: torch.randn(*s, generator=g) for n, s in
             [("hada_w1_a", (out, r)), ("hada_w1_b", (r, inp)), ("hada_w2_a", (out, r)), ("hada_w2_b", (r, inp))]}
    return LycorisLayer("loha", parts, alpha=2.0)


def _lokr(seed: int) -> LycorisLayer:
    g = torch.Generator().manual_seed(seed)
    parts = {"lokr_w1": torch.randn(4, 2, generator=g), "lokr_w2_a": torch.randn(6, 3, generator=g),
             "lokr_w2_b": torch.randn(3, 5, generator=g)}
    return LycorisLayer("lokr", parts, alpha=3.0)


@pytest.mark.parametrize("layer", [_loha(24, 18, 3, 1), _lokr(2)], ids=["loha", "lokr"])
def test_lycoris_goes_through_dense(layer):
    svd = linalg.layer_svd(layer)
    assert_sv_match(svd.S, dense_sv(layer))
    b, a, shape = linalg.flat_factors(layer)
    dense = layer.delta(torch.float64)
    assert ((b @ a).double().reshape(shape) - dense).norm() <= 1e-5 * dense.norm()


@pytest.mark.parametrize("kind", KINDS)
def test_sum_svd_matches_dense_weighted_sum(kind):
    layers = [make_layer(kind, 24, 10, r, seed=s, ill=s == 1) for s, r in enumerate((4, 8, 3))]
    weights = [1.0, -0.5, 2.0]
    svd = linalg.sum_svd(list(zip(layers, weights)))
    dense = sum(w * ly.delta(torch.float64) for ly, w in zip(layers, weights))
    assert svd.rank == min(15, 24, svd.Vh.shape[1])
    assert_sv_match(svd.S, torch.linalg.svdvals(dense.flatten(1)))
    assert (svd.dense().double() - dense).norm() <= 1e-5 * dense.norm()


def test_sum_svd_with_lycoris_and_1x1_mixed_with_linear():
    lora = make_layer("linear", 24, 18, 5, seed=4)
    loha = _loha(24, 18, 2, 5)
    svd = linalg.sum_svd([(lora, 0.7), (loha, 1.3)])
    dense = 0.7 * lora.delta(torch.float64) + 1.3 * loha.delta(torch.float64)
    assert_sv_match(svd.S, torch.linalg.svdvals(dense))
    conv = make_layer("conv1x1", 24, 18, 3, seed=6)  # (24, 18, 1, 1) is the same weight as (24, 18)
    svd = linalg.sum_svd([(lora, 1.0), (conv, 1.0)])
    assert svd.shape == (24, 18, 1, 1)


def test_factors_are_the_eckart_young_optimum():
    layer = make_layer("conv3x3", 20, 6, 10, seed=7)
    svd = linalg.layer_svd(layer, torch.float64)
    for k in (1, 4, 10):
        for scale in (1.0, 0.25, -2.0):
            up, down = svd.factors(k, scale)
            assert up.shape == (20, k, 1, 1) and down.shape == (k, 6, 3, 3)
            approx = scale * (up.flatten(1) @ down.flatten(1))
            err = (approx - layer.delta(torch.float64).flatten(1)).norm()
            assert abs(err - svd.S[k:].norm()) <= 1e-9 * svd.S.norm()
    with pytest.raises(LoraValueError):
        svd.factors(0)
    with pytest.raises(LoraValueError):
        svd.factors(11)


def test_refusals():
    a = make_layer("linear", 20, 10, 4)
    b = make_layer("linear", 20, 12, 4)
    with pytest.raises(LoraValueError, match="cannot be summed"):
        linalg.sum_svd([(a, 1.0), (b, 1.0)])
    with pytest.raises(LoraValueError):
        linalg.sum_svd([])
    bad = LoRALayer(down=a.down.clone(), up=a.up.clone(), alpha=3.0)
    bad.down[0, 0] = float("nan")
    with pytest.raises(LoraValueError, match="NaN"):
        linalg.layer_svd(bad, key="unet.x")


def test_inputs_not_mutated():
    layers = [make_layer(k, 12, 8, 4, seed=i) for i, k in enumerate(KINDS)]
    before = [{n: t.clone() for n, t in ly.tensors().items()} for ly in layers]
    for ly in layers:
        linalg.layer_svd(ly)
        linalg.layer_svd(ly, torch.float64)
    linalg.sum_svd([(layers[2], 2.0), (layers[3], 3.0)])
    for ly, old in zip(layers, before):
        assert all(torch.equal(t, old[n]) for n, t in ly.tensors().items())


def test_not_forming_delta_is_much_cheaper():
    """The factored path never builds d×k: its outputs are (d, r) and (r, k), whatever d and k."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALayer(down=torch.randn(8, 1024, generator=g), up=torch.randn(2048, 8, generator=g), alpha=8.0)
    svd = linalg.layer_svd(layer)
    assert svd.U.shape == (2048, 8) and svd.Vh.shape == (8, 1024)
    ref = torch.linalg.svdvals(layer.up.double() @ layer.down.double())[:8]  # the non-zero part of the spectrum
    assert float((svd.S.double() - ref).abs().max()) <= REL * float(ref[0])


def test_cholesky_fast_path_matches_householder_and_declines_ill_conditioned():
    from lora_ops import linalg

    g = torch.Generator().manual_seed(7)
    b, a = torch.randn(300, 16, generator=g, dtype=torch.float64), torch.randn(16, 200, generator=g,
                                                                               dtype=torch.float64)
    assert linalg._cholesky_r(b) is not None and linalg._cholesky_r(a.T) is not None
    u, s, vh = linalg.svd_of_product(b, a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:16], rtol=1e-10, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close((u * s) @ vh, b @ a, rtol=1e-10, atol=1e-10)
    bad = b.clone()
    bad[:, 0] = bad[:, 1] * (1 + 1e-9)  # nearly dependent columns: κ² too large for Cholesky-QR
    assert linalg._cholesky_r(bad) is None
    expected = torch.linalg.svdvals(bad @ a)[:16]
    torch.testing.assert_close(linalg.svd_of_product(bad, a)[1], expected, rtol=1e-6, atol=1e-9)


def test_factored_fast_path_forms_only_the_kept_directions():
    """The Cholesky path keeps U = B·u_core and Vh = vh_core·A as products; u(k)/vh(k) equal the explicit ones."""
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(90, 24, generator=g, dtype=torch.float64), torch.randn(24, 70, generator=g,
                                                                              dtype=torch.float64)
    svd = linalg.factored_svd(b, a, (90, 70))
    assert svd.u_core is not None and svd.vh_core is not None  # the lazy path was taken
    assert svd.dims == (90, 70) and svd.U.shape == (90, 24) and svd.Vh.shape == (24, 70)
    for k in (1, 5, 24):
        torch.testing.assert_close(svd.u(k), svd.U[:, :k])
        torch.testing.assert_close(svd.vh(k), svd.Vh[:k])
        up, down = svd.factors(k)
        err = (up @ down - b @ a).norm()
        assert abs(err - svd.S[k:].norm()) <= 1e-9 * svd.S.norm()  # Eckart–Young optimum
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-10)


def test_sum_svd_of_three_rank_r_stacks_truncates_exactly():
    """A combine-shaped sum (3 × rank 16 → core 48) kept at k = 16: σ and the truncation error match dense fp64."""
    layers = [make_layer("linear", 120, 80, 16, seed=s) for s in range(3)]
    weights = [1.0, 0.7, -0.5]
    svd = linalg.sum_svd(list(zip(layers, weights)))
    dense = sum(w * ly.delta(torch.float64) for ly, w in zip(layers, weights))
    assert_sv_match(svd.S, torch.linalg.svdvals(dense))
    up, down = svd.factors(16)
    assert up.shape == (120, 16) and down.shape == (16, 80)
    err = float((up.double() @ down.double() - dense).norm())
    assert abs(err - float(svd.S[16:].double().norm())) <= 1e-5 * float(svd.S.double().norm())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["up", "down"])
def test_non_finite_factor_is_caught_by_the_gram_check(value, where):
    layer = make_layer("linear", 30, 20, 4, seed=1)
    getattr(layer, where)[2, 1] = value
    with pytest.raises(LoraValueError, match="NaN"):
        linalg.layer_svd(layer, key="unet.x")
    with pytest.raises(LoraValueError, match="NaN"):
        linalg.sum_svd([(layer, 1.0), (make_layer("linear", 30, 20, 4, seed=2), 1.0)], key="unet.x")


def test_finite_factor_whose_gram_overflows_falls_back_to_qr():
    """fp64 values near 1e200 square to inf in the Gram matrix without being damaged: Householder QR takes over."""
    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    big = b * 1e200
    assert linalg._cholesky_r(big) is None
    u, s, vh = linalg.svd_of_product(big, a * 1e-200)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:6], rtol=1e-10, atol=0)


@pytest.mark.parametrize("r", [1, 63, 64, 65, 128, 200, 384])
def test_gram_matrix_is_the_full_product_and_symmetric(r):
    """The upper-block Gram equals mᵀm (every entry one dot product: equal to rounding), symmetric."""
    m = torch.randn(300, r, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    gram = linalg.gram_matrix(m)
    assert gram.shape == (r, r)
    assert torch.allclose(gram, m.T @ m, rtol=1e-13, atol=1e-12)
    assert torch.allclose(gram, gram.T, rtol=0, atol=1e-12)
