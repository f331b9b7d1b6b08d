"""The SVD of ΔW = s·B·A from the factors alone, and of a weighted sum of several layers' ΔW.

For B (d×r) and A (r×k): B = Q_b R_b, Aᵀ = Q_a R_a (reduced QR), so ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ. The SVD of the
small core R_b R_aᵀ = U_c Σ V_cᵀ gives ΔW = (Q_b U_c) · sΣ · (Q_a V_c)ᵀ: O((d+k)r²) work, exact (QR and SVD are
backward stable), and every singular value comes out — min(d, k, r) of them; the rest of ΔW's spectrum is exactly
zero. A weighted sum Σ wᵢ sᵢ Bᵢ Aᵢ is the same product with B_cat = [w₁s₁B₁ | w₂s₂B₂ …] and A_cat = [A₁; A₂ …].

Conv layers flatten to (out, r) and (r, in·kh·kw) and reshape back; a Tucker ``mid`` is folded into ``down`` first.
LoHa/LoKr layers have no cheap factorisation: their ΔW is formed (per layer) and factorised by a dense SVD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import LoraValueError
from .lora import Layer, LoRALayer

Tensor = torch.Tensor


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW = U · diag(S) · Vh with ΔW flattened to (out, in·kh·kw); ``shape`` is ΔW's own shape.

    U and Vh may be kept as products, U = ``left`` · ``u_core`` and Vh = ``vh_core`` · ``right`` (the factors and
    small r×m matrices), so that a caller keeping k of m directions pays for d×r×k, not d×r×m: `u`/`vh` form only
    the leading columns/rows. Without cores, ``left`` is U and ``right`` is Vh.
    """

    left: Tensor  # (d, m) U itself, or (d, r) with U = left @ u_core
    S: Tensor  # (m,), descending, ≥ 0
    right: Tensor  # (m, k) Vh itself, or (r, k) with Vh = vh_core @ right
    shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw)
    u_core: Tensor | None = None  # (r, m)
    vh_core: Tensor | None = None  # (m, r)

    @property
    def rank(self) -> int:
        """How many singular values there are (min(d, k, r)); trailing ones may be zero."""
        return int(self.S.shape[0])

    @property
    def U(self) -> Tensor:  # noqa: N802 — the textbook name
        """Every left singular vector, (d, m): formed on each access when kept as a product."""
        return self.u(self.rank)

    @property
    def Vh(self) -> Tensor:  # noqa: N802
        """Every right singular vector, (m, k): formed on each access when kept as a product."""
        return self.vh(self.rank)

    @property
    def dims(self) -> tuple[int, int]:
        """(d, k) of the flattened ΔW, without forming U or Vh."""
        return int(self.left.shape[0]), int(self.right.shape[1])

    def u(self, k: int) -> Tensor:
        """The first k left singular vectors (d, k); only those are multiplied out."""
        return self.left[:, :k] if self.u_core is None else self.left @ self.u_core[:, :k]

    def vh(self, k: int) -> Tensor:
        """The first k right singular vectors as rows (k, in·kh·kw); only those are multiplied out."""
        return self.right[:k] if self.vh_core is None else self.vh_core[:k] @ self.right

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def factors(self, k: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """(up, down) of rank k with scale·up·down = the best rank-k approximation of ΔW (Eckart–Young).

        The singular values are split evenly, up = U_k·√(σ/scale), down = √(σ/scale)·V_kᵀ, so both factors have
        the same magnitude (kohya puts all of σ into up). A negative scale flips the sign of up.
        """
        if not 1 <= k <= self.rank:
            raise LoraValueError(f"rank {k} outside 1..{self.rank}")
        if scale == 0:
            raise LoraValueError("cannot factor with scale 0 (alpha 0)")
        root = (self.S[:k] / abs(scale)).sqrt()  # (k,)
        up = self.u(k) * root  # (out, k)
        if scale < 0:
            up = -up
        down = root[:, None] * self.vh(k)  # (k, in·kh·kw)
        if self.is_conv:
            return up.reshape(self.shape[0], k, 1, 1), down.reshape(k, *self.shape[1:])  # (out,k,1,1), (k,in,kh,kw)
        return up, down

    def dense(self, k: int | None = None) -> Tensor:
        """The (truncated) ΔW in its own shape — for tests and references; forms a d×k matrix."""
        k = self.rank if k is None else k
        flat = (self.u(k) * self.S[:k]) @ self.vh(k)  # (out, in·kh·kw)
        return flat.reshape(self.shape)




def flat_factors(layer: Layer, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(B, A, shape) with ΔW.flatten(1) = B @ A: B (out, m) carries the alpha/r scale, A (m, in·kh·kw).

    LoRA: m = r, the Tucker mid folded into A. LoHa/LoKr: the dense ΔW's SVD at its numerical rank.
    """
    if not isinstance(layer, LoRALayer):
        svd = dense_svd(layer.delta(dtype))
        m = numerical_rank(svd.S, svd.U.shape[0], svd.Vh.shape[1])
        return svd.U[:, :m] * svd.S[:m], svd.Vh[:m], svd.shape
    up = layer.up.to(dtype).flatten(1)  # (out, r)
    down = layer.down.to(dtype)
    if layer.mid is not None:
        core = torch.einsum("ijkl,jc->ickl", layer.mid.to(dtype), down.flatten(1))  # (r, in, kh, kw)
        a = core.flatten(1)  # (r, in·kh·kw)
    else:
        a = down.flatten(1)  # (r, in·kh·kw)
    return up * layer.scale, a, layer.delta_shape


GRAM_BLOCK = 64  # column block of `gram_matrix`: 64 measured fastest for d×384 fp64 on one thread


def gram_matrix(m: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """mᵀm (r×r) for a tall m (n×r), computing only the blocks on and above the diagonal and mirroring them.

    A plain ``m.T @ m`` computes both triangles of the symmetric result (torch has no SYRK); block row i times the
    columns from i on does (1 + 1/nb)/2 of that work for nb blocks — 7/12 at r = 384 (an SVD combine of three
    rank-128 LoRAs), measured 25–45 % faster for d = 1280…10240 in fp64 on one thread. Each entry is still one
    dot product, so the rounding is a GEMM's.
    """
    r = m.shape[1]
    if r <= block:
        return m.T @ m
    gram = torch.empty(r, r, dtype=m.dtype, device=m.device)
    for i in range(0, r, block):
        row = m[:, i : i + block].T @ m[:, i:]  # (b, r − i)
        gram[i : i + block, i:] = row
        gram[i + block :, i : i + block] = row[:, block:].T
    return gram


CHOLESKY_MIN_PIVOT = 1e-4  # smallest/largest Cholesky pivot accepted: error ≈ κ²·eps64 ≤ 1e-8 relative


def _cholesky_r(m: Tensor, key: str | None = None) -> Tensor | None:
    """Upper-triangular R with m = Q·R (m is n×r), from the Cholesky factor of the fp64 Gram matrix mᵀm.

    One GEMM instead of a Householder QR plus forming Q: several times faster on tall factors. Its error grows
    with κ(m)², so it declines (None) when m is rank-deficient or ill-conditioned; the caller then uses QR.
    The Gram diagonal holds Σ mᵢⱼ² per column, so it is non-finite exactly when m has a NaN/Inf (fp16/fp32
    values cannot overflow fp64 when squared): that replaces a separate pass over m (which costs as much as the
    Gram itself on r = 128 factors); only then is m scanned, to raise for a damaged layer.
    """
    gram = gram_matrix(m.double())  # (r, r)
    if not bool(torch.isfinite(gram.diagonal()).all()):
        _check_finite(m, key)  # raises on NaN/Inf; a finite fp64 overflow falls back to QR
        return None
    lower, info = torch.linalg.cholesky_ex(gram)  # (r, r)
    if int(info) != 0:
        return None
    pivots = lower.diagonal()
    if not bool(torch.isfinite(pivots).all()) or float(pivots.min()) <= CHOLESKY_MIN_PIVOT * float(pivots.max()):
        return None
    return lower.T  # (r, r)


def svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vh of B @ A (B d×r, A r×k) via QR of B and Aᵀ and the SVD of the small core; B @ A is never formed."""
    svd = factored_svd(b, a, (b.shape[0], a.shape[1]))
    return svd.U, svd.S, svd.Vh


def factored_svd(b: Tensor, a: Tensor, shape: tuple[int, ...], key: str | None = None) -> FactoredSVD:
    """The SVD of B @ A (B d×r, A r×k) as a `FactoredSVD`, B @ A never formed; raises if B or A has NaN/Inf.

    Fast path (well-conditioned factors, the usual case): Cholesky-QR in fp64 — R from the Gram matrices, the core
    R_b·R_aᵀ formed in fp64 — and U = B·(R_b⁻¹U_c), Vh = (V_cᵀR_a⁻ᵀ)·A kept as products, so only the directions a
    caller keeps are multiplied out. The core's SVD runs in B's dtype: fp32 σ of an fp64-accurate core are within
    a few eps32·σ₀ (far inside the 1e-5·σ₀ goal) at ~70 % of the fp64 cost, which dominates at r = 384.
    Otherwise Householder QR and explicit U, Vh.
    """
    r_b = _cholesky_r(b, key) if b.shape[0] >= b.shape[1] else None
    r_a = _cholesky_r(a.T, key) if r_b is not None and a.shape[1] >= a.shape[0] else None
    if r_b is not None and r_a is not None:
        core = (r_b @ r_a.T).to(b.dtype)  # (r, r)
        u_c, s, vh_c = torch.linalg.svd(core)  # (r, r), (r,), (r, r)
        left = torch.linalg.solve_triangular(r_b, u_c.double(), upper=True)  # R_b⁻¹·U_c (r, r)
        right = torch.linalg.solve_triangular(r_a, vh_c.double().T, upper=True)  # R_a⁻¹·V_c (r, r)
        return FactoredSVD(b, s.to(b.dtype), a, shape, left.to(b.dtype), right.T.to(a.dtype))
    _check_finite(b, key)
    _check_finite(a, key)
    q_b, r_b = torch.linalg.qr(b)  # (d, p), (p, r); p = min(d, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (k, q), (q, r); q = min(k, r)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, m), (m,), (m, q)
    return FactoredSVD(q_b @ u_c, s, vh_c @ q_a.T, shape)  # (d, m), (m,), (m, k)


def dense_svd(delta: Tensor) -> FactoredSVD:
    """The reference path: the SVD of a formed ΔW (reduced, so U is d×min(d,k), not d×d)."""
    flat = delta.flatten(1)  # (out, in·kh·kw)
    _check_finite(flat)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return FactoredSVD(u, s, vh, tuple(delta.shape))


def layer_svd(layer: Layer, dtype: torch.dtype = torch.float32, *, key: str | None = None) -> FactoredSVD:
    """The exact SVD of one layer's ΔW (alpha/r included) in ``dtype`` (fp32, or fp64 for more digits)."""
    if not isinstance(layer, LoRALayer):
        return dense_svd(_checked(layer.delta(dtype), key))
    b, a, shape = flat_factors(layer, dtype)
    return factored_svd(b, a, shape, key)


def sum_svd(
    terms: Sequence[tuple[Layer, float]], dtype: torch.dtype = torch.float32, *, key: str | None = None
) -> FactoredSVD:
    """The exact SVD of Σ wᵢ·ΔWᵢ from the concatenated factors B_cat = [w₁s₁B₁ | …], A_cat = [A₁; …]."""
    if not terms:
        raise LoraValueError("nothing to sum", key=key)
    bs, as_, shape = [], [], None
    for layer, weight in terms:
        b, a, s = flat_factors(layer, dtype)
        shape = common_shape(shape, s, key)
        bs.append(b * weight)
        as_.append(a)
    b_cat, a_cat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)  # (out, Σr), (Σr, in·kh·kw)
    return factored_svd(b_cat, a_cat, shape, key)


def numerical_rank(s: Tensor, d: int, k: int) -> int:
    """How many singular values stand above rounding noise, at least 1.

    The SVD's own noise floor is a few eps·σ₀ (measured ~3e-7·σ₀ in fp32 for LoHa-sized layers); the cut-off
    σ₀·eps·√max(d, k) sits an order of magnitude above it, far below anything an fp16 file can store (5e-4).
    numpy's matrix_rank uses max(d, k) instead of its square root, which would drop real directions at 1e-4·σ₀.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    tol = float(s[0]) * torch.finfo(s.dtype).eps * max(d, k) ** 0.5
    return max(1, int((s > tol).sum()))


def same_flat_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal shapes, or (out, in) and (out, in, 1, 1): the same weight of a 1×1 conv."""
    return a == b or (a[:2] == b[:2] and a[2:] in ((), (1, 1)) and b[2:] in ((), (1, 1)))


def common_shape(shape: tuple[int, ...] | None, new: tuple[int, ...], key: str | None) -> tuple[int, ...]:
    if shape is None:
        return new
    if not same_flat_shape(shape, new):
        raise LoraValueError(f"layers of shapes {shape} and {new} cannot be summed", key=key,
                             hint="the LoRAs were made for different models")
    return shape if len(shape) >= len(new) else new


def _checked(t: Tensor, key: str | None) -> Tensor:
    _check_finite(t, key)
    return t


def _check_finite(t: Tensor, key: str | None = None) -> None:
    if not torch.isfinite(t).all():
        raise LoraValueError("ΔW has NaN/Inf values", key=key, hint="the LoRA file is damaged or overflowed in fp16")
