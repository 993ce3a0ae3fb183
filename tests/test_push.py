"""Publishing: `quantize --push-to-hub` and `push` through the real huggingface_hub client against the
local Hub server, the model card's metadata as the Hub parses it, and failed uploads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import HubServer, hub_env
from huggingface_hub import ModelCard, snapshot_download

from moeconvert import Scheme, quantize, verify
from moeconvert.card import build_card, card_metadata

TOKEN = "hf_pushtoken_5a1e7c0ffee"
SOURCE_CARD = """---
license: apache-2.0
language: en
---
# tiny mixtral
"""

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def w4(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-bit output (round-to-nearest: publishing does not care how it was made)."""
    out = tmp_path_factory.mktemp("push") / "tiny-mixtral-w4"
    quantize(
        str(tiny_models["mixtral"]),
        Scheme(bits=4, group_size=32, method="rtn"),
        output=out,
        verify=False,
        progress=False,
    )
    return out


@pytest.fixture
def server(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """acme/tiny-mixtral (with a model card stating its license) on a server that wants TOKEN for writes."""
    source = Path(shutil.copytree(tiny_models["mixtral"], tmp_path / "source"))
    (source / "README.md").write_text(SOURCE_CARD)
    with HubServer(tmp_path / "hub_root", token=TOKEN) as hub:
        hub.add_repo("acme/tiny-mixtral", source)
        hub_env(hub, monkeypatch, tmp_path)
        yield hub


def test_quantize_push_to_hub_round_trip(server: HubServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "quantize", "acme/tiny-mixtral", "-o", str(out), "--method", "rtn", "--bits", "8", "--group-size", "32",
        "--push-to-hub", "acme/tiny-mixtral-int8", "--private", env={"HF_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pushed" in result.stdout and "acme/tiny-mixtral-int8@main" in result.stdout
    assert "no parity report" not in result.stderr  # verified before the push
    for text in (result.stdout, result.stderr, *(p.read_text(errors="replace") for p in out.iterdir())):
        assert TOKEN not in text

    downloaded = Path(snapshot_download("acme/tiny-mixtral-int8", token=TOKEN, cache_dir=tmp_path / "dl"))
    assert read_tree(downloaded) == read_tree(out)
    assert server.repo_files("acme/tiny-mixtral-int8") == read_tree(out)

    card = ModelCard.load(downloaded / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny-mixtral"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0"  # the source's own license
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"moe", "rtn", "8-bit", "mixtral", "compressed-tensors"} <= set(data["tags"])
    assert "datasets" not in data  # the built-in corpus is not a Hub dataset
    report = json.loads((out / "quantization_report.json").read_text())
    parity = json.loads((out / "verify_report.json").read_text())
    assert report["source"]["revision"] == server.commit_sha("acme/tiny-mixtral")
    assert f"{parity['kl_mean']:.3e}" in card.text and f"{parity['top1_agreement']:.4f}" in card.text
    assert (
        'from_pretrained("acme/tiny-mixtral-int8"' in card.text
        and "vllm serve acme/tiny-mixtral-int8" in card.text
    )
    assert report["calibration"]["seed"] == 0 and report["versions"]["transformers"] in card.text
    before, after = report["sizes"]["source_bytes"], report["sizes"]["output_bytes"]
    assert after == sum(p.stat().st_size for p in out.glob("*.safetensors")) and 1.5 < before / after < 4


def test_push_to_a_branch_of_an_existing_repo(server: HubServer, w4: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(w4, tmp_path / "w4"))
    main_before = server.repo_files("acme/tiny-mixtral")
    first = run_cli("push", str(folder), "acme/tiny-mixtral", "--branch", "w4", "--commit-message", "Add w4",
                    env={"HF_TOKEN": TOKEN})  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert f"note: {folder} has no parity report" in first.stderr  # made with verify=False
    assert server.repo_files("acme/tiny-mixtral", "w4") == read_tree(folder)
    assert server.repo_files("acme/tiny-mixtral") == main_before  # main untouched
    card = ModelCard.load(folder / "README.md")
    assert 'from_pretrained("acme/tiny-mixtral", revision="w4"' in card.text
    assert "vllm serve acme/tiny-mixtral --revision w4" in card.text
    assert card.data.base_model is None  # the source was a local folder: its Hub id is unknown


def test_failed_upload_keeps_the_folder_and_says_what_to_rerun(
    server: HubServer, w4: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(w4, tmp_path / "w4"))
    run_cli("push", str(folder), "acme/w4", env={"HF_TOKEN": TOKEN})  # card now names the repo
    before = read_tree(folder)
    server.fail_next("POST", r"/api/models/acme/w4b/commit/", status=500)
    failed = run_cli("push", str(folder), "acme/w4b", env={"HF_TOKEN": TOKEN})
    assert failed.returncode == 3, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "is intact" in lines[0] and f"rerun `moeconvert push {folder} acme/w4b`" in lines[0]
    assert TOKEN not in failed.stderr + failed.stdout
    assert server.repo_files("acme/w4b") == {}  # nothing half-committed
    card_files = ("README.md", "SHA256SUMS")  # the card now names acme/w4b, and the manifest follows it
    after = read_tree(folder)
    assert {k: v for k, v in after.items() if k not in card_files} == {
        k: v for k, v in before.items() if k not in card_files
    }
    assert run_cli("check", str(folder)).returncode == 0

    server.clear_log()
    again = run_cli("push", str(folder), "acme/w4b", env={"HF_TOKEN": TOKEN})
    assert again.returncode == 0, again.stderr
    assert server.repo_files("acme/w4b") == read_tree(folder)
    assert not any(method == "PUT" for method, _ in server.requests)  # LFS files uploaded before the failure


def test_push_without_a_token_is_refused_cleanly(server: HubServer, w4: Path) -> None:
    result = run_cli("push", str(w4), "acme/nope", env={"HF_TOKEN": ""})
    assert result.returncode == 3 and "401" in result.stderr and "HF_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_folder_that_failed_its_parity_check_is_pushed_only_when_allowed(
    server: HubServer, tiny_models: dict[str, Path], w4: Path, tmp_path: Path
) -> None:
    """quantize --push-to-hub publishes nothing that failed its check, and neither does push: unless
    asked, and then the card says it failed."""
    folder = Path(shutil.copytree(w4, tmp_path / "failed"))
    verify(
        str(tiny_models["mixtral"]),
        str(folder),
        max_kl=0.0,
        samples=2,
        seq_len=32,
        store=True,
        progress=False,
    )
    server.clear_log()
    refused = run_cli("push", str(folder), "acme/failed", env={"HF_TOKEN": TOKEN})
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "failed its parity check (mean KL" in refused.stderr and "--allow-failed" in refused.stderr
    assert server.requests == []
    allowed = run_cli("push", str(folder), "acme/failed", "--allow-failed", env={"HF_TOKEN": TOKEN})
    assert allowed.returncode == 0, allowed.stderr
    card = server.repo_files("acme/failed")["README.md"].decode()
    assert "| result | **failed**: mean KL" in card


@pytest.mark.parametrize(
    ("make", "repo", "fragment"),
    [
        (lambda p: p / "missing", "acme/x", "no such folder"),
        (lambda p: p, "acme/x", "nothing to push"),
        (lambda p: p / "q", "not-a-repo-id", "not a Hub repository id"),
    ],
)
def test_push_bad_input(make, repo: str, fragment: str, w4: Path, tmp_path: Path) -> None:
    shutil.copytree(w4, tmp_path / "q")
    result = run_cli("push", str(make(tmp_path)), repo)
    assert (
        result.returncode == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )


def test_card_of_a_vision_language_output_loads_it_as_one(quantized: dict) -> None:
    """Qwen3.5 keeps its vision encoder: the card loads the whole model as image-text-to-text (a causal LM
    class would load the text model alone) and tags it so on the Hub."""
    folder = quantized["qwen3_5_moe", "w4"]
    report = json.loads((folder / "quantization_report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    card = build_card(report, config, None, "me/qwen3.5-w4")
    assert ModelCard(str(card)).data.to_dict()["pipeline_tag"] == "image-text-to-text"
    assert 'AutoModelForImageTextToText.from_pretrained("me/qwen3.5-w4"' in card.text
    assert "AutoProcessor" in card.text and "AutoTokenizer" not in card.text
    assert "For text alone, `AutoModelForCausalLM` loads just the text model" in card.text
    glm = build_card(report, {**config, "model_type": "glm4v_moe"}, None, "me/glm-4.5v-w4")
    assert (
        "AutoModelForImageTextToText" in glm.text and "AutoModelForCausalLM" not in glm.text
    )  # none in transformers
    text_only = build_card(report, {**config, "vision_config": None}, None, "me/x")
    assert ModelCard(str(text_only)).data.to_dict()["pipeline_tag"] == "text-generation"
    assert 'AutoModelForCausalLM.from_pretrained("me/x"' in text_only.text


def test_card_cites_a_hub_calibration_dataset_and_omits_lineage_for_local_sources() -> None:
    report = {
        "model": "/models/my-moe",
        "scheme": {
            "bits": 4,
            "group_size": 128,
            "sym": True,
            "method": "gptq",
            "act_order": True,
            "damp": 0.01,
        },
        "format": "gptq",
        "calibration": {"source": "allenai/c4:en:train:text", "samples": 128, "seq_len": 2048, "seed": 3},
        "device": "cuda",
        "quantized_modules": 10,
        "kept_modules": ["model.layers.0.mlp.shared_expert_gate"],
        "source": {"model": "/models/my-moe", "id": None, "revision": None},
    }
    card = build_card(report, {"model_type": "qwen2_moe"}, None, "me/my-moe-w4")
    parsed = ModelCard(str(card)).data.to_dict()
    assert parsed["datasets"] == ["allenai/c4"]
    assert "base_model" not in parsed and "base_model_relation" not in parsed
    assert {"gptq", "4-bit", "qwen2_moe"} <= set(parsed["tags"])
    assert "128 x 2048 tokens" in card.text and "act-order" in card.text and "Not verified" in card.text
    assert "1 Linear modules kept" in card.text and "vllm serve me/my-moe-w4" in card.text
    assert card_metadata(report, {}).license is None
