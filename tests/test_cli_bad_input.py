"""Bad input from a newcomer: every mistake is refused before any work, in one line (CLI: exit 2, stderr) naming
the file or argument and the reason; hints name the CLI's flags (CLI) or the node's inputs (nodes), never the
Python API's keywords; nothing is written when something is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import import_pack, sample_lora

from lora_ops import families
from lora_ops import lora as L
from lora_ops.cli import CLI_WORDING, MAX_STRENGTH, main, parse_weighted
from lora_ops.errors import LoraFileError, LoraOpsError, LoraValueError, UnsafeFileError
from lora_ops.files import load_lora, save_lora


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv: str) -> str:
    """Run a command that must be refused: exit 2, one stderr line, no traceback; returns that line."""
    code, _out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lora-ops ") and "Traceback" not in err, err
    return err


@pytest.fixture
def unet_only(tmp_path):
    lora = L.filter_layers(sample_lora("sd1", attention_only=True), lambda k: k.startswith("unet."))
    return save_lora(lora, tmp_path / "unet_only.safetensors", "kohya")


@pytest.fixture
def full(tmp_path):
    return save_lora(sample_lora("sd1", attention_only=True), tmp_path / "full.safetensors", "kohya")


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------- 1. convert --to peft --component


def test_peft_component_without_layers_is_refused_and_nothing_written(tmp_path, capsys, unet_only):
    out = tmp_path / "te.safetensors"
    err = refused(capsys, "convert", unet_only, "--to", "peft", "--component", "text_encoder", "-o", out)
    assert "unet_only.safetensors" in err and "no text_encoder layers" in err and "--component unet" in err
    assert not out.exists()


def test_convert_reports_the_layers_actually_written(tmp_path, capsys, full):
    total = len(load_lora(full).layers)
    unet = sum(k.startswith("unet.") for k in load_lora(full).layers)
    code, out, _ = run(capsys, "convert", full, "--to", "peft", "--component", "unet", "-o", tmp_path / "u.safetensors")
    assert code == 0 and f"{unet} of {total} layers: unet only" in out
    assert len(load_lora(tmp_path / "u.safetensors").layers) == unet
    code, out, _ = run(capsys, "convert", full, "--to", "comfyui", "-o", tmp_path / "c.safetensors")
    assert code == 0 and f"(comfyui, {total} layers, from kohya)" in out


def test_component_without_peft_is_refused(tmp_path, capsys, full):
    err = refused(capsys, "convert", full, "--to", "kohya", "--component", "unet", "-o", tmp_path / "k.safetensors")
    assert "--component only applies with --to peft" in err
    assert not (tmp_path / "k.safetensors").exists()


# --------------------------------------------------------------------------------- 2. FILE[:w[:w_text]] specs


@pytest.mark.parametrize("suffix, bad", [(":abc", "'abc'"), (":0.7:abc", "'abc'"), (":", "''")])
def test_a_strength_that_is_not_a_number_is_named(tmp_path, capsys, unet_only, suffix, bad):
    spec = f"{unet_only}{suffix}"
    err = refused(capsys, "merge", spec, "-o", tmp_path / "m.safetensors", "-q")
    assert spec in err and f"strength {bad} is not a number" in err and "file not found" not in err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "0.5:nan"])
def test_non_finite_strengths_are_refused_naming_the_file(tmp_path, capsys, unet_only, strength):
    err = refused(capsys, "merge", f"{unet_only}:{strength}", "-o", tmp_path / "m.safetensors", "-q")
    assert "unet_only.safetensors" in err and "not a finite number" in err


@pytest.mark.parametrize("strength", ["1e9", "-101", "0.5:1e9"])
def test_absurd_strengths_are_refused_saying_why(tmp_path, capsys, unet_only, strength):
    err = refused(capsys, "merge", f"{unet_only}:{strength}", "-o", tmp_path / "m.safetensors", "-q")
    assert "unet_only.safetensors" in err and f"beyond ±{MAX_STRENGTH:g}" in err and "typo" in err
    assert main(["merge", f"{unet_only}:100:-100", "-o", str(tmp_path / "ok.safetensors"), "-q"]) == 0  # the bound


def test_bake_shares_the_strict_parser(tmp_path, capsys, unet_only):
    for spec, reason in ((f"{unet_only}:abc", "is not a number"), (f"{unet_only}:nan", "not a finite number"),
                         (f"{unet_only}:1:1e9", "beyond")):
        err = refused(capsys, "bake", tmp_path / "ck.safetensors", spec, "-o", tmp_path / "b.safetensors", "-q")
        assert spec in err and reason in err


def test_colons_in_existing_paths_still_work(tmp_path, capsys, unet_only, monkeypatch):
    odd = tmp_path / "v1:final.safetensors"
    odd.write_bytes(unet_only.read_bytes())
    assert parse_weighted(str(odd)) == (str(odd), 1.0, 1.0)
    assert parse_weighted(f"{odd}:0.5:0.25") == (str(odd), 0.5, 0.25)
    assert parse_weighted("a.safetensors:0.5:0.25") == ("a.safetensors", 0.5, 0.25)
    assert parse_weighted("C:dir/a.safetensors:0.7") == ("C:dir/a.safetensors", 0.7, 0.7)
    # a missing file whose last part looks like a path is reported as a missing file, not as a strength
    assert parse_weighted("missing:lora.safetensors") == ("missing:lora.safetensors", 1.0, 1.0)
    assert parse_weighted("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0, 1.0)
    with pytest.raises(LoraValueError, match="strength '0.7x' is not a number"):
        parse_weighted("missing.safetensors:0.7x")
    code, out, _ = run(capsys, "merge", f"{odd}:0.5", "-o", tmp_path / "m.safetensors", "-q")
    assert code == 0 and "wrote" in out


# ----------------------------------------------------------------------------------------- 3. output paths


def test_missing_output_folder_is_refused_not_created(tmp_path, capsys, unet_only):
    out = tmp_path / "nonexistent" / "dir" / "x.safetensors"
    for argv in (["convert", unet_only, "--to", "kohya", "-o", out],
                 ["resize", unet_only, "--rank", "2", "-q", "-o", out],
                 ["merge", unet_only, "-q", "-o", out]):
        err = refused(capsys, *argv)
        assert f"the -o folder {out.parent} does not exist" in err and str(out) in err
    assert not (tmp_path / "nonexistent").exists()


def test_output_must_be_a_safetensors_file(tmp_path, capsys, unet_only):
    for name in ("out.txt", "out", "out.safetensors.bak"):
        err = refused(capsys, "convert", unet_only, "--to", "kohya", "-o", tmp_path / name)
        assert name in err and "-o must name a .safetensors file" in err
        assert not (tmp_path / name).exists()
    assert run(capsys, "convert", unet_only, "--to", "kohya", "-o", tmp_path / "UP.SAFETENSORS")[0] == 0


def test_output_that_is_the_input_is_refused_in_any_spelling(tmp_path, capsys, unet_only):
    before = unet_only.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(unet_only)
    hard = tmp_path / "hard.safetensors"
    os.link(unet_only, hard)
    (tmp_path / "sub").mkdir()
    dotted = tmp_path / "sub" / ".." / unet_only.name
    for out in (unet_only, link, hard, dotted):
        for argv in (["resize", unet_only, "--rank", "2", "-q"], ["convert", unet_only, "--to", "comfyui"],
                     ["merge", f"{unet_only}:0.5", "-q"]):
            err = refused(capsys, *argv, "-o", out, "--overwrite")
            assert f"-o is the input {unet_only}" in err and str(out) in err
    assert unet_only.read_bytes() == before == hard.read_bytes()


def test_report_and_plot_paths_are_checked_before_any_work(tmp_path, capsys, unet_only):
    out = tmp_path / "r.safetensors"
    err = refused(capsys, "resize", unet_only, "--rank", "2", "-q", "-o", out, "--report", tmp_path / "no" / "r.json")
    assert f"the --report folder {tmp_path / 'no'} does not exist" in err
    err = refused(capsys, "resize", unet_only, "--rank", "2", "-q", "-o", out, "--plot", tmp_path / "p.txt")
    assert "--plot must name a .png file" in err
    err = refused(capsys, "resize", unet_only, "--rank", "2", "-q", "-o", out, "--report", out)
    assert "--report is the same file as -o" in err
    err = refused(capsys, "resize", unet_only, "--rank", "2", "-q", "-o", out, "--plot", unet_only.with_suffix(".png"),
                  "--report", unet_only)
    assert f"--report is the input {unet_only}" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory):
    """The tiny SD1 pipeline saved twice: with safetensors weights, and pickled (UNet and VAE as .bin)."""
    from lora_ops.testing import tiny

    root = tmp_path_factory.mktemp("pipes")
    pipe = tiny.tiny_sd1_pipeline()
    pipe.save_pretrained(root / "safe", safe_serialization=True)
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    assert list((root / "pickled" / "unet").glob("*.bin")) and not list((root / "pickled" / "unet").glob("*.safe*"))
    return root


def test_bake_to_a_diffusers_folder_keeps_working(tmp_path, capsys, pipeline_folders, unet_only):
    out = tmp_path / "baked"
    code, text, err = run(capsys, "bake", pipeline_folders / "safe", f"{unet_only}:0.5", "-o", out, "-q")
    assert code == 0, err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and "baked" in text
    err = refused(capsys, "bake", pipeline_folders / "safe", unet_only, "-o", tmp_path / "baked.safetensors", "-q")
    assert "is a folder too" in err
    err = refused(capsys, "bake", pipeline_folders / "safe", unet_only, "-o", tmp_path / "no" / "baked", "-q")
    assert "does not exist" in err


def test_bake_refuses_writing_over_one_of_its_loras(tmp_path, capsys, unet_only):
    before = unet_only.read_bytes()
    err = refused(capsys, "bake", tmp_path / "ck.safetensors", unet_only, "-o", unet_only, "--overwrite", "-q")
    assert "-o is the input" in err
    assert unet_only.read_bytes() == before


# -------------------------------------------------------------------------------------------- 4. --version


def test_version(capsys, monkeypatch):
    from importlib import metadata

    import lora_ops

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lora-ops {metadata.version('lora-ops')}"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lora-ops {lora_ops.__version__} (not installed)"


# --------------------------------------------------------------------------------- 5. inspect's metadata line


def test_inspect_says_how_many_metadata_keys_are_not_listed(tmp_path, capsys):
    meta = {f"key_{i:02d}": str(i) for i in range(45)}
    path = save_lora(sample_lora("sd1", attention_only=True, metadata=meta), tmp_path / "m.safetensors", "kohya")
    code, out, _ = run(capsys, "inspect", path)
    line = next(line for line in out.splitlines() if line.startswith("metadata:"))
    assert code == 0 and line.startswith("metadata: 45 key(s): key_00, ") and "key_11" in line
    assert "key_12" not in line and line.endswith("… (+33 more; --json lists all)")
    few = save_lora(sample_lora("sd1", attention_only=True, metadata={"a": "1"}), tmp_path / "f.safetensors", "kohya")
    assert run(capsys, "inspect", few)[1].splitlines()[-1] == "metadata: 1 key(s): a"


# ------------------------------------------------------------------------- 6. API wording vs CLI/node wording


def test_library_hints_speak_api_and_the_cli_translates(tmp_path, capsys, unet_only):
    from lora_ops.bake import bake

    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(LoraFileError) as info:
        bake(unet_only, [(load_lora(unet_only), 1.0, 1.0)], out)
    assert info.value.hint == "pass overwrite=True to replace it"
    err = refused(capsys, "convert", unet_only, "--to", "kohya", "-o", out)
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert out.read_bytes() == b"old"
    pickle = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    err = refused(capsys, "inspect", pickle)
    assert "--allow-pickle" in err and "allow_pickle=True" not in err
    extra = tmp_path / "extra.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({**load_file(str(unet_only)), "lora_unet_mystery.weird": torch.zeros(1)}, str(extra))
    err = refused(capsys, "inspect", extra)
    assert "--lenient" in err and "strict=False" not in err


def test_wording_tables_cover_old_and_new_spellings():
    from lora_ops.errors import reword

    for api in ("pass overwrite=True to replace it", "pass overwrite=True / --overwrite to replace it"):
        assert reword(api, CLI_WORDING) == "pass --overwrite to replace it"
    assert reword("pass strict=False / --lenient to load the rest", CLI_WORDING) == "pass --lenient to load the rest"
    assert reword("or pass strict=False to bake the layers that match", CLI_WORDING).endswith("--partial to bake "
                                                                                             "the layers that match")
    assert "--component" in reword("pick one with component=… / --component", CLI_WORDING)
    for api in ("pass family=", "pass family='sd1' or 'sdxl'"):
        assert reword(api, CLI_WORDING) == "pass --family (" + ", ".join(families.IDS) + ")"
    err = LoraValueError("extract takes per-layer rank rules", file="f",
                         hint="use a per-layer rule (fixed, sv_ratio, sv_fro, sv_cumulative), then resize to size_mb")
    assert err.message(CLI_WORDING).endswith("(use --rank, --sv-ratio, --sv-fro or --sv-cumulative, then resize "
                                             "--size-mb)")
    assert str(err).startswith("f: extract takes") and "sv_fro" in str(err)  # the library's own text is API


def test_nodes_reword_library_hints_for_their_users(tmp_path):
    pack = import_pack()
    comfy_env = pack.nodes.comfy_env
    loras = tmp_path / "loras"
    loras.mkdir()
    torch.save({"w": torch.zeros(1)}, loras / "legacy.pt")
    comfy_env.configure(loras=[loras], output=tmp_path)
    try:
        with pytest.raises(pack.lora_ops.errors.UnsafeFileError) as info:
            pack.nodes.LoraOpsLoad().load("legacy.pt")
    finally:
        comfy_env.configure(loras=[], output=None)
    text = str(info.value)
    assert "legacy.pt" in text and "the nodes never load pickles" in text and "allow_pickle=True" not in text
    assert "lora-ops convert FILE --allow-pickle" in text


# ------------------------------------------------------------------------------ 7. the Save and Stack nodes


@pytest.fixture
def node_env(tmp_path):
    pack = import_pack()
    comfy_env = pack.nodes.comfy_env
    loras, output = tmp_path / "loras", tmp_path / "output"
    loras.mkdir()
    output.mkdir()
    save_lora(sample_lora("sd1", attention_only=True), loras / "a.safetensors", "kohya")
    comfy_env.configure(loras=[loras], output=output)
    yield pack, output
    comfy_env.configure(loras=[], output=None)


def test_save_node_refuses_a_too_long_prefix_typed(node_env):
    pack, output = node_env
    lora = pack.lora_ops.files.load_lora(output.parent / "loras" / "a.safetensors")
    for prefix, what in (("x" * 300, "file name"), ("loras/" + "d" * 300 + "/x", "folder name")):
        with pytest.raises(pack.lora_ops.errors.LoraFileError) as info:
            pack.nodes.LoraOpsSave().save(lora, prefix, "kohya")
        text = str(info.value)
        assert "filename_prefix is too long" in text and what in text and "limit is 255" in text
        assert prefix[:40] in text and "(" in text  # names (the start of) the prefix and its length
    assert not any(output.rglob("*"))
    name = "y" * 236  # the longest last part: + _00001_.safetensors = 255 bytes
    assert pack.nodes.LoraOpsSave().save(lora, name, "kohya")["result"][0] == f"{name}_00001_.safetensors"


@pytest.mark.parametrize("text, reason", [
    ('{"a": ' + "9" * 5000 + "}", "integer of 5000 digits"),
    ('{"a": ' + "[" * 2000 + "]" * 2000 + "}", "nested"),
    ('{"a": NaN}', "NaN"),
    ('{"a": 1e999}', "infinity"),
    ('{"a": "1", "a": "2"}', "twice"),
    ('{"a": 1', "not valid JSON"),
])
def test_save_node_metadata_json_is_parsed_safely(node_env, text, reason):
    pack, output = node_env
    lora = pack.lora_ops.files.load_lora(output.parent / "loras" / "a.safetensors")
    with pytest.raises(pack.lora_ops.errors.LoraValueError, match="metadata") as info:
        pack.nodes.LoraOpsSave().save(lora, "loras/x", "kohya", metadata=text)
    assert reason in str(info.value)
    assert not any(output.rglob("*.safetensors"))


@pytest.mark.parametrize("rows, reason", [
    ('[{"lora": "a.safetensors", "strength_model": ' + "9" * 5000 + "}]", "integer of 5000 digits"),
    ("[" * 5000 + "]" * 5000, "nested"),
    ('[{"lora": "a.safetensors", "strength_model": NaN}]', "NaN"),
    ('[{"lora": "a.safetensors", "strength_clip": 1e999}]', "infinity"),
    ('[{"lora": "a.safetensors", "strength_model": 1e9}]', "beyond ±100"),
    ('[{"lora": "a.safetensors", "strength_model": true}]', "strength_model must be a finite number"),
    ('[{"lora": "a.safetensors", "enabled": "false"}]', "enabled must be true or false"),
    ('[{"lora": 7}]', "needs a 'lora' file name"),
    ('{"lora": "a.safetensors"}', "array"),
    ("[{", "not valid JSON"),
])
def test_stack_rows_json_is_parsed_safely(node_env, rows, reason):
    pack, _ = node_env
    stack = pack.nodes.LoraOpsStack
    with pytest.raises(pack.lora_ops.errors.LoraValueError) as info:
        stack().stack(rows)
    assert reason in str(info.value) and "Traceback" not in str(info.value)
    assert reason in stack.VALIDATE_INPUTS(rows)
    assert stack.IS_CHANGED(rows) == rows  # never raises either


# ------------------------------------------------------------------- 8. train --model on a pickled folder


def _data(tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "1_red"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(data / "0.png")
    (data / "0.txt").write_text("a red square")
    return tmp_path / "data"


def test_train_refuses_a_pickled_model_folder_without_allow_pickle(tmp_path, capsys, pipeline_folders):
    out = tmp_path / "run"
    err = refused(capsys, "train", _data(tmp_path), "--model", pipeline_folders / "pickled", "-o", out,
                  "--max-steps", "1", "-q")
    assert "diffusion_pytorch_model.bin" in err and "pickle" in err and "--allow-pickle" in err
    assert "allow_pickle=True" not in err and not out.exists()


def test_allow_pickle_loads_with_weights_only(pipeline_folders, monkeypatch):
    from lora_ops.train.diffusers_backend import DiffusersBackend

    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        DiffusersBackend.from_pretrained(pipeline_folders / "pickled")
    assert calls == []  # refused before anything was unpickled
    backend = DiffusersBackend.from_pretrained(pipeline_folders / "pickled", allow_pickle=True)
    assert backend.family == "sd1" and calls and all(w is True for w in calls), calls
    calls.clear()
    DiffusersBackend.from_pretrained(pipeline_folders / "safe")  # safetensors need no permission, no torch.load
    assert calls == []


def test_train_output_folder_parent_must_exist(tmp_path, capsys):
    err = refused(capsys, "train", _data(tmp_path), "--tiny", "sd1", "-o", tmp_path / "no" / "run", "-q",
                  "--max-steps", "1")
    assert "does not exist" in err and str(tmp_path / "no") in err


# -------------------------------------------------------------------------------- 9. convert of NaN factors


def test_convert_warns_about_nan_layers(tmp_path, capsys):
    lora = sample_lora("sd1", attention_only=True)
    key = sorted(lora.layers)[3]
    up = lora[key].up.clone()
    up[0, 0] = float("inf")
    bad = save_lora(lora.replace(layers={**lora.layers, key: lora[key].with_tensors({"up": up})}),
                    tmp_path / "bad.safetensors", "kohya")
    out = tmp_path / "out.safetensors"
    code, text, err = run(capsys, "convert", bad, "--to", "comfyui", "-o", out)
    assert code == 0 and "wrote" in text and out.is_file()
    assert err.count("\n") == 1 and "warning" in err and "NaN/Inf in 1 layer(s)" in err and key in err
    assert str(bad) in err
    code, _, err = run(capsys, "convert", out, "--to", "kohya", "-o", tmp_path / "clean-check.safetensors")
    assert code == 0 and key in err  # still flagged after the round trip: the values were copied, not hidden


def test_errors_stay_library_errors(tmp_path):
    """The refusals are typed: scripts calling the helpers catch LoraOpsError, not SystemExit or OSError."""
    from lora_ops.cli import check_output

    with pytest.raises(LoraOpsError):
        check_output(str(tmp_path / "no" / "x.safetensors"))
    with pytest.raises(LoraOpsError):
        parse_weighted("x.safetensors:nope")
    assert json.loads(json.dumps(CLI_WORDING))  # a plain table (pattern, replacement)
