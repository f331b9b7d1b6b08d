"""The weight shapes a full FLUX.1-dev LoRA adapts, by canonical key (BFL names, ``unet.`` prefix).

Every Linear of the transformer (/work/shared/model-families.md §2.1; hidden H = 3072, 24 heads × 128, mlp 4H):

    double_blocks.0-18    {img,txt}_attn.qkv (3H, H), {img,txt}_attn.proj (H, H), {img,txt}_mlp.0 (4H, H),
                          {img,txt}_mlp.2 (H, 4H), {img,txt}_mod.lin (6H, H)                  → 19 × 10 layers
    single_blocks.0-37    linear1 (7H = q, k, v, mlp 4H, H), linear2 (H, 5H), modulation.lin (3H, H) → 38 × 3
    img_in (H, 64), txt_in (H, 4096), {time,guidance}_in.in_layer (H, 256), vector_in.in_layer (H, 768),
    {time,vector,guidance}_in.out_layer (H, H), final_layer.linear (64, H), final_layer.adaLN_modulation.1 (2H, H)
                                                                                               → 10

Total 314 layers, the count of ComfyUI's FLUX.1 Linears (and of a kohya LoRA with every module trained).
"""

from __future__ import annotations

HIDDEN = 3072
MLP = 4 * HIDDEN
DOUBLE, SINGLE = 19, 38
IN_CHANNELS, CONTEXT, POOLED, TIME = 64, 4096, 768, 256  # img_in 16 ch × 2×2, T5-XXL, CLIP-L pooled, timestep


def flux1_shapes(h: int = HIDDEN, double: int = DOUBLE, single: int = SINGLE) -> dict[str, tuple[int, int]]:
    """Canonical key → (out, in) for every Linear of a FLUX.1-dev transformer of width ``h``."""
    mlp = 4 * h
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(double):
        d = f"unet.double_blocks.{i}."
        for s in ("img", "txt"):
            shapes.update({d + f"{s}_attn.qkv": (3 * h, h), d + f"{s}_attn.proj": (h, h), d + f"{s}_mlp.0": (mlp, h),
                           d + f"{s}_mlp.2": (h, mlp), d + f"{s}_mod.lin": (6 * h, h)})
    for i in range(single):
        s = f"unet.single_blocks.{i}."
        shapes.update({s + "linear1": (3 * h + mlp, h), s + "linear2": (h, h + mlp), s + "modulation.lin": (3 * h, h)})
    shapes.update({
        "unet.img_in": (h, IN_CHANNELS), "unet.txt_in": (h, CONTEXT),
        "unet.time_in.in_layer": (h, TIME), "unet.time_in.out_layer": (h, h),
        "unet.vector_in.in_layer": (h, POOLED), "unet.vector_in.out_layer": (h, h),
        "unet.guidance_in.in_layer": (h, TIME), "unet.guidance_in.out_layer": (h, h),
        "unet.final_layer.linear": (IN_CHANNELS, h), "unet.final_layer.adaLN_modulation.1": (2 * h, h),
    })
    return shapes


def one_of_each(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Block 0 of each kind plus the 10 layers outside the blocks: every distinct shape once (23 layers)."""
    keep = ("unet.double_blocks.0.", "unet.single_blocks.0.")
    return {k: s for k, s in shapes.items() if k.startswith(keep) or "_blocks." not in k}


if __name__ == "__main__":
    shapes = flux1_shapes()
    params = sum(o + i for o, i in shapes.values())
    print(f"{len(shapes)} layers; {params:,} LoRA parameters per unit of rank")  # noqa: T201
