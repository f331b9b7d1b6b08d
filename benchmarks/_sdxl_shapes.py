"""The weight shapes an SDXL LoRA (kohya's default targets) adapts, by canonical key.

UNet (SGM/LDM names): every SpatialTransformer's proj_in/proj_out (linear in SDXL) and, in each of its transformer
blocks, attn1 q/k/v/out, attn2 q/k/v/out (k/v read the 2048-wide text context), ff.net.0.proj (GEGLU: 8C) and
ff.net.2. SDXL has no transformers at the 320-channel level; 640 channels carry depth 2, 1280 depth 10:

    input_blocks.4.1, 5.1 (640, 2)   input_blocks.7.1, 8.1 (1280, 10)   middle_block.1 (1280, 10)
    output_blocks.0-2.1 (1280, 10)   output_blocks.3-5.1 (640, 2)

→ 11 transformers, 70 blocks, 722 layers. Text encoders: CLIP ViT-L (te1: 12 layers, 768 wide, MLP 3072) and
OpenCLIP ViT-bigG (te2: 32 layers, 1280 wide, MLP 5120), each layer q/k/v/out_proj + mlp.fc1/fc2 → 72 + 192.
Total 986 layers, the count of a kohya SDXL LoRA with text encoders.
"""

from __future__ import annotations

CONTEXT = 2048  # SDXL cross-attention context width (CLIP-L 768 + bigG 1280)
TRANSFORMERS = [  # (LDM path, channels, depth)
    ("input_blocks.4.1", 640, 2),
    ("input_blocks.5.1", 640, 2),
    ("input_blocks.7.1", 1280, 10),
    ("input_blocks.8.1", 1280, 10),
    ("middle_block.1", 1280, 10),
    ("output_blocks.0.1", 1280, 10),
    ("output_blocks.1.1", 1280, 10),
    ("output_blocks.2.1", 1280, 10),
    ("output_blocks.3.1", 640, 2),
    ("output_blocks.4.1", 640, 2),
    ("output_blocks.5.1", 640, 2),
]
TEXT_ENCODERS = [("te1", 12, 768, 3072), ("te2", 32, 1280, 5120)]  # (prefix, layers, width, MLP width)


def unet_shapes() -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for path, c, depth in TRANSFORMERS:
        base = f"unet.{path}"
        shapes[f"{base}.proj_in"] = (c, c)
        for i in range(depth):
            blk = f"{base}.transformer_blocks.{i}"
            for attn, ctx in (("attn1", c), ("attn2", CONTEXT)):
                shapes[f"{blk}.{attn}.to_q"] = (c, c)
                shapes[f"{blk}.{attn}.to_k"] = (c, ctx)
                shapes[f"{blk}.{attn}.to_v"] = (c, ctx)
                shapes[f"{blk}.{attn}.to_out.0"] = (c, c)
            shapes[f"{blk}.ff.net.0.proj"] = (8 * c, c)  # GEGLU: value and gate, 4C each
            shapes[f"{blk}.ff.net.2"] = (c, 4 * c)
        shapes[f"{base}.proj_out"] = (c, c)
    return shapes


def text_encoder_shapes() -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for prefix, layers, width, mlp in TEXT_ENCODERS:
        for i in range(layers):
            base = f"{prefix}.text_model.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{base}.self_attn.{proj}"] = (width, width)
            shapes[f"{base}.mlp.fc1"] = (mlp, width)
            shapes[f"{base}.mlp.fc2"] = (width, mlp)
    return shapes


def sdxl_shapes() -> dict[str, tuple[int, int]]:
    """Every layer: 722 UNet + 264 text-encoder shapes (out, in)."""
    return {**unet_shapes(), **text_encoder_shapes()}


def quick_shapes() -> dict[str, tuple[int, int]]:
    """A small subset with every kind of layer at the 640-channel level and one CLIP-L layer (for --quick)."""
    keep = ("unet.input_blocks.4.1.", "te1.text_model.encoder.layers.0.")
    return {k: s for k, s in sdxl_shapes().items() if k.startswith(keep)}


if __name__ == "__main__":
    shapes = sdxl_shapes()
    unet = sum(k.startswith("unet.") for k in shapes)
    print(f"{len(shapes)} layers: {unet} UNet, {len(shapes) - unet} text encoder")  # noqa: T201
