"""A vision model is a GGUF and its projector, both blobs of the store under one name: made by a
Modelfile with two FROM lines, by Ollama's create with two files (the official client), or by a
pull from a hub repo with an `mmproj` file; shown with `projector_info` and the `vision`
capability; a projector another model uses outlives `rm`; a bad projector is refused before
anything is written; the memory estimate counts it. The files are the vision fixture's
(tests/vision_fixture.py): SmolLM2 with SmolVLM's tokens and an Idefics3 projector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from myllm.create import create_model
from myllm.errors import InvalidModelFile, MyLLMError
from myllm.pull import pull
from myllm.pull.hub import projector_for
from myllm.registry import migrations
from myllm.registry.schema import metadata
from myllm.registry.store import Registry
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.placement.memory import estimate, footprint
from myllm.settings import Settings
from tests import server
from tests.conftest import writable_home
from tests.fakehub import FakeHub
from tests.postgres import throwaway_cluster
from tests.server import running_servers
from tests.vision_fixture import ProjectorShape, VisionModel, write_projector

REPO = "fixture/SmolVLM-GGUF"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored(registry: Registry) -> list[str]:
    """Every file in the blob folder, temp files included."""
    return sorted(p.name for p in registry.blobs.root.iterdir())


def modelfile(*froms: Path | str) -> str:
    return "".join(f"FROM {f}\n" for f in froms) + "PARAMETER temperature 0\n"


# -- the Modelfile's second FROM ---------------------------------------------------------------


@pytest.mark.parametrize("order", ["model first", "projector first"])
def test_a_modelfile_with_two_froms_registers_both_blobs(order: str, registry: Registry, settings: Settings,
                                                         vision: VisionModel) -> None:
    froms = (vision.text, vision.projector) if order == "model first" else (vision.projector, vision.text)
    row = create_model(registry, settings, "vis", modelfile(*froms), vision.text.parent)
    assert (row.digest, row.projector_digest) == (sha(vision.text), sha(vision.projector))
    assert row.projector_size == vision.projector.stat().st_size and row.vision
    assert row.parameters == {"temperature": 0.0}
    assert registry.problem(registry.get("vis")) is None
    assert registry.blobs.digests() == {sha(vision.text), sha(vision.projector)}
    assert registry.projector_file(row) == registry.blobs.path(sha(vision.projector))


def test_a_projector_added_to_a_registered_model_and_shared_until_the_last_rm(
    registry: Registry, settings: Settings, vision: VisionModel, tmp_path: Path
) -> None:
    pull(registry, settings, str(vision.text), name="text")
    assert not registry.get("text").vision
    create_model(registry, settings, "seeing", modelfile("text", vision.projector), tmp_path)
    create_model(registry, settings, "seeing-too", "FROM seeing\nSYSTEM hi\n", tmp_path)  # copies keep the projector
    projector = sha(vision.projector)
    assert registry.get("seeing-too").projector_digest == projector
    registry.remove("seeing")
    assert registry.blobs.exists(projector), "seeing-too still uses it"
    registry.remove("seeing-too")
    assert not registry.blobs.exists(projector)
    assert registry.blobs.digests() == {sha(vision.text)}, "the text model's blob stays with `text`"
    registry.remove("text")
    assert stored(registry) == []


def test_replacing_a_vision_model_lets_go_of_its_projector(registry: Registry, settings: Settings,
                                                           vision: VisionModel) -> None:
    create_model(registry, settings, "vis", modelfile(vision.text, vision.projector),
                 vision.text.parent)
    create_model(registry, settings, "vis", modelfile(vision.text), vision.text.parent)
    assert not registry.get("vis").vision
    assert registry.blobs.digests() == {sha(vision.text)}


def bad_projectors(vision: VisionModel, folder: Path) -> dict[str, tuple[Path, str]]:
    """A projector that is not one, with what the refusal says."""
    import numpy as np
    from gguf import GGMLQuantizationType

    wide = write_projector(folder / "wide-mmproj.gguf", ProjectorShape(text_width=640))
    junk = folder / "junk-mmproj.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    f16_positions = folder / "f16-mmproj.gguf"
    _rewrite_tensor(vision.projector, f16_positions, "v.position_embd.weight",
                    lambda data: (data.astype(np.float16), GGMLQuantizationType.F16))
    return {
        "width mismatch": (wide, "writes embeddings of 640 values, but the model"),
        "not a GGUF": (junk, "is not a model llama.cpp can load: it is not a GGUF file"),
        "another model": (vision.text, "two FROM lines name models"),
        "F16 position embeddings": (f16_positions, "'v.position_embd.weight' is F16; libmtmd adds or multiplies"),
    }


def _rewrite_tensor(source: Path, dest: Path, name: str, change: object) -> None:
    """A copy of the projector `source` with one tensor changed (`change(data) -> (data, type)`)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(dest, arch="clip")
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data, kind = (tensor.data, tensor.tensor_type)
        if tensor.name == name:
            data, kind = change(data)  # type: ignore[operator]
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case", ["width mismatch", "not a GGUF", "another model", "F16 position embeddings"])
def test_a_bad_projector_is_refused_with_nothing_written(case: str, registry: Registry, settings: Settings,
                                                          vision: VisionModel, tmp_path: Path) -> None:
    projector, problem = bad_projectors(vision, tmp_path)[case]
    pull(registry, settings, str(vision.text), name="text")
    before = stored(registry)
    for base in (vision.text, "text"):  # from a file, and onto a registered model
        with pytest.raises(MyLLMError) as refused:
            create_model(registry, settings, "vis", modelfile(base, projector), tmp_path)
        assert problem in refused.value.message
        assert refused.value.status == 400
        assert registry.find("vis") is None
        assert stored(registry) == before, "no blob, no temp file"


def test_the_width_mismatch_names_both_files(registry: Registry, settings: Settings, vision: VisionModel,
                                            tmp_path: Path) -> None:
    wide = write_projector(tmp_path / "wide-mmproj.gguf", ProjectorShape(text_width=640))
    with pytest.raises(InvalidModelFile) as refused:
        create_model(registry, settings, "vis", modelfile(vision.text, wide), tmp_path)
    assert refused.value.message == (
        f"the projector file:{wide} writes embeddings of 640 values, but the model file:{vision.text} has an "
        "embedding width (n_embd) of 576: the projector is not made for this model")


def test_a_projector_alone_is_no_model(registry: Registry, settings: Settings, vision: VisionModel) -> None:
    with pytest.raises(InvalidModelFile, match=r"is a multimodal projector \(architecture clip\), not a model"):
        pull(registry, settings, str(vision.projector), name="proj")
    assert stored(registry) == []


# -- a hub repo's mmproj ------------------------------------------------------------------------


def test_the_projector_of_the_closest_precision_is_picked_as_llama_server_does() -> None:
    names = ["m-F16.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-F16.gguf", "mmproj-m-Q8_0.gguf",
             "sub/mmproj-x.gguf"]
    assert projector_for("m-Q4_K_M.gguf", names) == "mmproj-m-Q8_0.gguf"
    assert projector_for("m-F16.gguf", names) == "mmproj-m-F16.gguf"
    assert projector_for("sub/m-Q8_0.gguf", names) == "sub/mmproj-x.gguf"  # its own folder first
    assert projector_for("m-Q8_0.gguf", ["m-Q8_0.gguf", "README.md"]) is None


@pytest.fixture
def hub(vision: VisionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    wide = write_projector(tmp_path / "wide.gguf", ProjectorShape(text_width=640))
    repos = {
        REPO: {"SmolVLM-Q8_0.gguf": vision.text, "mmproj-SmolVLM-F16.gguf": vision.projector,
               "README.md": vision.projector},
        "fixture/Mismatched-GGUF": {"SmolVLM-Q8_0.gguf": vision.text, "mmproj-SmolVLM-Q8_0.gguf": wide},
    }
    with FakeHub(repos) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def test_a_pull_from_a_repo_with_an_mmproj_brings_the_projector(hub: FakeHub, registry: Registry, settings: Settings,
                                                                 vision: VisionModel) -> None:
    row = pull(registry, settings, f"{REPO}:Q8_0").model
    assert row.name == "smolvlm:q8_0" and row.source == f"hf:{REPO}/SmolVLM-Q8_0.gguf"
    assert (row.digest, row.projector_digest) == (sha(vision.text), sha(vision.projector))
    assert not any(settings.downloads_dir.iterdir()), "both downloads moved into the store"


def test_a_pull_whose_projector_does_not_fit_keeps_nothing(hub: FakeHub, registry: Registry,
                                                           settings: Settings) -> None:
    with pytest.raises(InvalidModelFile, match="writes embeddings of 640 values"):
        pull(registry, settings, "fixture/Mismatched-GGUF:Q8_0")
    assert registry.list() == [] and stored(registry) == []


# -- Ollama's create and show, the native list, through a daemon ---------------------------------


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-registry") / "home")
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


@pytest.fixture(scope="module")
def daemon_registry(urls: tuple[str, str]) -> Registry:
    assert server.LAST_APP is not None
    return server.LAST_APP.state.services.registry  # type: ignore[no-any-return]


def test_ollama_create_with_two_files_then_show(client: ollama.Client, urls: tuple[str, str],
                                                daemon_registry: Registry, vision: VisionModel) -> None:
    files = {vision.projector.name: client.create_blob(vision.projector),
             vision.text.name: client.create_blob(vision.text)}
    statuses = [p.status for p in client.create(model="smolvlm:test", files=files, stream=True)]
    assert statuses[-1] == "success"
    assert f"using existing layer sha256:{sha(vision.projector)}" in statuses
    assert "vision" in (client.show("smolvlm:test").capabilities or [])
    info = httpx.post(f"{urls[1]}/api/show", json={"model": "smolvlm:test"}).json()["projector_info"]  # not in the client
    assert info["general.architecture"] == "clip" and info["clip.projector_type"] == "idefics3"
    assert info["clip.vision.projection_dim"] == 576 and info["clip.has_vision_encoder"] is True
    assert "vision" not in (client.show("smollm2:135m").capabilities or [])
    assert "projector_info" not in httpx.post(f"{urls[1]}/api/show", json={"model": "smollm2:135m"}).json()
    models = {m["name"]: m for m in httpx.get(f"{urls[0]}/api/models").json()["models"]}
    assert models["smolvlm:test"]["vision"] is True and models["smollm2:135m"]["vision"] is False
    detail = httpx.get(f"{urls[0]}/api/models/smolvlm:test").json()
    assert detail["projector_digest"] == sha(vision.projector)
    client.delete("smolvlm:test")
    for blob in (files[vision.projector.name], files[vision.text.name]):
        assert httpx.head(f"{urls[1]}/api/blobs/{blob}").status_code == 404, "no other model uses it"


def test_create_from_a_model_with_an_uploaded_projector_and_delete_keeps_the_shared_one(
    client: ollama.Client, urls: tuple[str, str], daemon_registry: Registry, vision: VisionModel
) -> None:
    """An extension: `from` with `files` holding a projector alone (how `myllm create` sends a
    Modelfile's FROM name + FROM projector file)."""
    digest = client.create_blob(vision.projector)
    body = {"model": "smol-seeing", "from": "smollm2:135m", "files": {"mmproj.gguf": digest}, "stream": False}
    response = httpx.post(f"{urls[1]}/api/create", json=body, timeout=60)
    assert response.status_code == 200, response.text
    row = daemon_registry.get("smol-seeing")
    assert row.digest == daemon_registry.get("smollm2:135m").digest and row.projector_digest == sha(vision.projector)
    client.copy("smol-seeing", "smol-seeing-2")
    client.delete("smol-seeing")
    assert httpx.head(f"{urls[1]}/api/blobs/{digest}").status_code == 200, "smol-seeing-2 still uses it"
    client.delete("smol-seeing-2")
    assert httpx.head(f"{urls[1]}/api/blobs/{digest}").status_code == 404
    assert daemon_registry.blobs.exists(daemon_registry.get("smollm2:135m").digest)


@pytest.mark.parametrize("files", ["two projectors", "a model with from"])
def test_create_refuses_files_that_are_not_a_model_and_its_projector(
    files: str, client: ollama.Client, urls: tuple[str, str], daemon_registry: Registry, vision: VisionModel
) -> None:
    projector, text_blob = client.create_blob(vision.projector), client.create_blob(vision.text)
    body: dict[str, object] = {"model": "nope", "stream": False}
    if files == "two projectors":
        body["files"] = {"a.gguf": projector, "b.gguf": projector}
    else:
        body.update({"from": "smollm2:135m", "files": {"m.gguf": text_blob}})
    response = httpx.post(f"{urls[1]}/api/create", json=body, timeout=60)
    assert response.status_code == 400
    assert "'files' must name one GGUF model" in response.json()["error"]
    assert daemon_registry.find("nope") is None


# -- memory and the load spec -----------------------------------------------------------------


def test_the_projector_counts_in_the_memory_estimate_and_on_the_gpu(registry: Registry, settings: Settings,
                                                                      vision: VisionModel) -> None:
    text_only = pull(registry, settings, str(vision.text), name="text").model
    seeing = create_model(registry, settings, "vis", modelfile(vision.text, vision.projector),
                          vision.text.parent)
    size = vision.projector.stat().st_size
    assert estimate(seeing, 1024).total - estimate(text_only, 1024).total == size
    fp, base = footprint(seeing, 1024), footprint(text_only, 1024)
    assert fp.split(0).ram - base.split(0).ram == size and fp.split(0).vram == 0
    for layers in (1, fp.max_gpu_layers):
        assert fp.split(layers).vram - base.split(layers).vram == size
        assert fp.split(layers).ram == base.split(layers).ram
    spec = LoadSpec.for_model(seeing, registry.blobs.path(seeing.digest), 1024,
                              projector=registry.projector_file(seeing))
    assert spec.projector == registry.blobs.path(sha(vision.projector))


# -- PostgreSQL ------------------------------------------------------------------------------


def test_the_migration_on_postgresql_keeps_models_and_shares_projectors(
    monkeypatch: pytest.MonkeyPatch, vision: VisionModel, smollm2_path: Path, tmp_path: Path
) -> None:
    with throwaway_cluster() as cluster:
        url = cluster.new_database()
        with monkeypatch.context() as before:  # a database as the previous release left it, with a model
            before.setattr(migrations, "MIGRATIONS", [m for m in migrations.MIGRATIONS if m[0] < "0010"])
            old = Registry.open(Settings(home=tmp_path, database_url=url))
            with old.engine.begin() as conn:
                conn.execute(text("INSERT INTO models (name, digest, size, architecture, family, parameter_count, "
                                  "parameter_size, quantization, context_length, vocab_size, parameters, details, "
                                  "created_at, modified_at) VALUES ('old:latest', :d, 1, 'llama', 'llama', 1, '1', "
                                  "'Q8_0', 1, 1, '{}', '{}', now(), now())"), {"d": "0" * 64})
            old.close()
        registry = Registry.open(Settings(home=tmp_path, database_url=url))
        try:
            assert migrations.schema_version(registry.engine) == migrations.MIGRATIONS[-1][0]
            with registry.engine.connect() as conn:
                assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert registry.get("old").projector_digest is None
            settings = Settings(home=tmp_path, database_url=url)
            for name in ("a", "b"):
                create_model(registry, settings, name, modelfile(vision.text, vision.projector),
                             vision.text.parent)
            registry.remove("a")
            assert registry.blobs.exists(sha(vision.projector))
            assert sha(vision.projector) not in registry.unused_blobs()
            registry.remove("b")
            assert not registry.blobs.exists(sha(vision.projector))
        finally:
            registry.close()


# -- the command line -----------------------------------------------------------------------


def test_myllm_create_list_and_show_a_vision_model(vision: VisionModel, tmp_path: Path) -> None:
    from tests.test_cli import myllm

    (tmp_path / "Modelfile").write_text(modelfile(vision.text, vision.projector))
    myllm("create", "vis", "-f", str(tmp_path / "Modelfile"))
    myllm("pull", str(vision.text), "--name", "text")
    listing = {line.split()[0]: line.split() for line in myllm("list").stdout.splitlines()[1:] if line.strip()}
    assert "yes" in listing["vis:latest"] and "yes" not in listing["text:latest"]
    assert f"projector {sha(vision.projector)}" in myllm("show", "vis").stdout
    assert "projector" not in myllm("show", "text").stdout
    shown = json.loads(myllm("show", "vis", "--json").stdout)
    assert shown["vision"] is True and shown["projector_size"] == vision.projector.stat().st_size
