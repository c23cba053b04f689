"""Run configuration: defaults, the shipped YAML, strict validation and --set overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from pipeline.config import (
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    Override,
    PromptConfig,
    RunConfig,
    config_from_dict,
    config_schema,
    config_to_dict,
    load_config,
    parse_set,
    validate_config,
)

OFFLINE_YAML = Path(__file__).parent.parent / "configs" / "offline.yaml"


def sets(*texts: str) -> list[Override]:
    """The overrides of ``--set`` options with these texts."""
    return [parse_set(text) for text in texts]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file() -> None:
    assert load_config() == RunConfig()
    assert load_config(None, []) == config_from_dict({})


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing set\n")) == RunConfig()


def test_offline_yaml_is_the_defaults() -> None:
    assert load_config(OFFLINE_YAML) == RunConfig()


def test_offline_yaml_comments_every_key() -> None:
    missing = [
        f"{number}: {line}"
        for number, line in enumerate(OFFLINE_YAML.read_text().splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#") and " # " not in line
    ]
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_offline_yaml_lists_every_key() -> None:
    # Written out in full so that it documents every key: compare key sets, not just values.
    import yaml

    data = yaml.safe_load(OFFLINE_YAML.read_text())
    defaults = config_to_dict(RunConfig())
    assert data.keys() == defaults.keys()
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert data[section].keys() == values.keys(), section


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
decoder: {source: clip.mp4, max_frames: 10}
encoder: {device: "cuda:1", dtype: bfloat16, image_size: 512, batch_size: 8}
tracker:
  min_score: 1        # an int where a float is expected is fine
  prompts:
    - box: [10, 20, 110, 220]
    - points: [[5, 6], [7, 8]]
      labels: [1, 0]
      frame: 3
publisher: {out: results, overlay: false}
transport: {publish: "tcp://*:6000", frames: "inproc://frames"}
""",
    )
    cfg = load_config(path)
    assert cfg.decoder.max_frames == 10
    assert cfg.encoder == EncoderConfig(
        device="cuda:1", dtype="bfloat16", image_size=512, batch_size=8
    )
    assert cfg.tracker.min_score == 1.0 and isinstance(cfg.tracker.min_score, float)
    assert cfg.tracker.prompts == (
        PromptConfig(box=(10.0, 20.0, 110.0, 220.0)),
        PromptConfig(points=((5.0, 6.0), (7.0, 8.0)), labels=(1, 0), frame=3),
    )
    assert cfg.publisher.out == "results" and cfg.publisher.overlay is False
    assert cfg.transport.publish == "tcp://*:6000"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"encoders": {}}, "encoders"),
        ({"encoder": {"batchsize": 2}}, "encoder.batchsize"),
        ({"tracker": {"prompts": [{"box": [0, 0, 1, 1], "bbox": 1}]}}, "tracker.prompts[0].bbox"),
    ],
)
def test_unknown_keys_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: unknown key \(valid keys: "):
        config_from_dict(data)


def test_unknown_key_error_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_dict({"encoder": {"batchsize": 2}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"encoder": {"batch_size": 1.5}}, "encoder.batch_size"),
        ({"encoder": {"batch_size": "4"}}, "encoder.batch_size"),
        ({"encoder": {"batch_size": True}}, "encoder.batch_size"),
        ({"tracker": {"min_score": "high"}}, "tracker.min_score"),
        ({"tracker": {"min_score": False}}, "tracker.min_score"),
        ({"tracker": {"use_mask_prompt": 1}}, "tracker.use_mask_prompt"),
        ({"tracker": {"use_mask_prompt": "yes"}}, "tracker.use_mask_prompt"),
        ({"publisher": {"out": 3}}, "publisher.out"),
        ({"decoder": {"max_frames": 2.0}}, "decoder.max_frames"),
        ({"weights": None}, "weights"),
        ({"encoder": [1, 2]}, "encoder"),
        ({"tracker": {"prompts": {"box": [0, 0, 1, 1]}}}, "tracker.prompts"),
        ({"tracker": {"prompts": [{"box": [0, 0, 1]}]}}, "tracker.prompts[0].box"),
        ({"tracker": {"prompts": [{"box": [0, 0, "1", 1]}]}}, "tracker.prompts[0].box[2]"),
        ({"tracker": {"prompts": [{"points": [[1, 2, 3]]}]}}, "tracker.prompts[0].points[0]"),
    ],
)
def test_wrong_types_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^<config>: {re.escape(key)}: expected "):
        config_from_dict(data)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level: expected a mapping"):
        load_config(write(tmp_path, "- encoder\n"))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"encoder": {"dtype": "float64"}}, "encoder.dtype"),
        ({"encoder": {"embedding_dtype": "int8"}}, "encoder.embedding_dtype"),
        ({"encoder": {"image_size": 1000}}, "encoder.image_size"),
        ({"encoder": {"image_size": 0}}, "encoder.image_size"),
        ({"encoder": {"batch_size": 0}}, "encoder.batch_size"),
        ({"encoder": {"device": "gpu"}}, "encoder.device"),
        ({"tracker": {"min_score": 1.5}}, "tracker.min_score"),
        ({"tracker": {"min_agreement": -0.1}}, "tracker.min_agreement"),
        ({"tracker": {"min_agreement": float("nan")}}, "tracker.min_agreement"),
        ({"tracker": {"max_coast_frames": -1}}, "tracker.max_coast_frames"),
        ({"tracker": {"confirm_frames": 0}}, "tracker.confirm_frames"),
        ({"tracker": {"process_noise": 0}}, "tracker.process_noise"),
        ({"tracker": {"process_noise": float("nan")}}, "tracker.process_noise"),
        ({"tracker": {"measurement_noise": float("inf")}}, "tracker.measurement_noise"),
        ({"publisher": {"status_interval_s": 0}}, "publisher.status_interval_s"),
        ({"decoder": {"max_frames": 0}}, "decoder.max_frames"),
        ({"transport": {"hwm": 0}}, "transport.hwm"),
        ({"transport": {"frames": "udp://host:1"}}, "transport.frames"),
        ({"transport": {"masks": "tcp://localhost"}}, "transport.masks"),
        ({"transport": {"publish": "tcp://127.0.0.1:70000"}}, "transport.publish"),
        ({"transport": {"publish": ""}}, "transport.publish"),
        ({"tracker": {"prompts": [{"frame": 4}]}}, "tracker.prompts[0].box"),
        ({"tracker": {"prompts": [{"box": [10, 10, 5, 20]}]}}, "tracker.prompts[0].box"),
        ({"tracker": {"prompts": [{"box": [0, 0, float("inf"), 1]}]}}, "tracker.prompts[0].box"),
        ({"tracker": {"prompts": [{"points": []}]}}, "tracker.prompts[0].points"),
        (
            {"tracker": {"prompts": [{"points": [[1, 2]], "labels": [1, 1]}]}},
            "tracker.prompts[0].labels",
        ),
        (
            {"tracker": {"prompts": [{"points": [[1, 2]], "labels": [2]}]}},
            "tracker.prompts[0].labels[0]",
        ),
        (
            {"tracker": {"prompts": [{"box": [0, 0, 1, 1], "labels": [1]}]}},
            "tracker.prompts[0].labels",
        ),
    ],
)
def test_bad_values_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^<config>: {re.escape(key)}: (must|a prompt|needs)"):
        config_from_dict(data)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "encoder:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: encoder\.batch_size: must"):
        load_config(path)


def test_duplicate_yaml_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "encoder:\n  batch_size: 2\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*duplicate key 'batch_size'"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: config file not found"):
        load_config(path)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "encoder: {batch_size: 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not valid YAML"):
        load_config(path)


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "decoder: {max_frames: 5}\nencoder: {dtype: bfloat16}\n")
    cfg = load_config(
        path,
        sets(
            "encoder.batch_size=2",
            "tracker.prompts=[{box: [1,2,30,40]}]",
            "decoder.max_frames=null",
            "publisher.png=false",
            "decoder.stream_id=7",  # a str field takes the text, not the int 7
            "transport={hwm: 16}",  # a whole section updates, keeping the other keys
        ),
    )
    assert cfg.encoder.batch_size == 2 and cfg.encoder.dtype == "bfloat16"  # file value kept
    assert cfg.tracker.prompts == (PromptConfig(box=(1.0, 2.0, 30.0, 40.0)),)
    assert cfg.decoder.max_frames is None
    assert cfg.publisher.png is False
    assert cfg.decoder.stream_id == "7"
    assert cfg.transport.hwm == 16 and cfg.transport.publish == RunConfig().transport.publish


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("encoder.batch_size", r"--set encoder\.batch_size: expected section\.key=value"),
        ("=4", r"--set =4: expected section\.key=value"),
        ("encoder.batchsize=2", r"encoder\.batchsize: unknown key \(valid keys: .*batch_size"),
        ("encoders.batch_size=2", r"encoders: unknown key"),
        ("encoder.batch_size.x=2", r"encoder\.batch_size\.x: unknown key"),
        ("encoder.batch_size=2.5", r"encoder\.batch_size: expected an integer"),
        ("encoder.batch_size=0", r"encoder\.batch_size: must be at least 1"),
        ("encoder.batch_size=[1", r"encoder\.batch_size: value is not valid YAML"),
        ("tracker.prompts=[{box: [1,2,3]}]", r"tracker\.prompts\[0\]\.box: expected"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=sets(override))


def test_dict_round_trip_through_json() -> None:
    cfg = load_config(
        overrides=sets(
            "tracker.prompts=[{box: [1, 2, 30, 40]}, {points: [[3, 4]], labels: [0], frame: 2}]",
            "publisher.out=out",
            "encoder.device=cuda:0",
        )
    )
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["tracker"]["prompts"][0]["box"] == [1.0, 2.0, 30.0, 40.0]
    assert config_from_dict(data) == cfg
    assert config_to_dict(config_from_dict(data)) == data


def test_validate_config_checks_replaced_values() -> None:
    cfg = msgspec.structs.replace(RunConfig(), encoder=EncoderConfig(image_size=100))
    with pytest.raises(ConfigError, match=r"encoder\.image_size: must be a positive multiple"):
        validate_config(cfg)


def test_replace_checks_the_rules_across_keys() -> None:
    # msgspec runs __post_init__ on replace too: a cross-key rule holds without validate_config.
    with pytest.raises(ConfigError, match=r"^reconnect_max_s: must be at least reconnect_initial"):
        msgspec.structs.replace(RunConfig().decoder, reconnect_initial_s=3.0)


def test_keys_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": encoder: every key must be a string \(valid keys: "):
        load_config(write(tmp_path, "encoder: {1: 2}\n"))


def test_json_schema_takes_the_shipped_yamls_and_refuses_bad_values() -> None:
    import yaml

    jsonschema = pytest.importorskip("jsonschema")
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in (OFFLINE_YAML, *LIVE_YAMLS):
        errors = [
            error.message for error in validator.iter_errors(yaml.safe_load(path.read_text()))
        ]
        assert errors == [], path.name
    for bad in (
        {"encoder": {"batchsize": 2}},
        {"encoder": {"batch_size": 0}},
        {"encoder": {"dtype": "float64"}},
        {"decoder": {"video_size": "640X480"}},
        {"tracker": {"prompts": [{"box": [0, 0, 1]}]}},
    ):
        assert not validator.is_valid(bad), bad


# -- live mode keys --------------------------------------------------------------------------

CONFIGS = Path(__file__).parent.parent / "configs"
LIVE_YAMLS = [CONFIGS / "webcam.yaml", CONFIGS / "rtsp.yaml"]


def test_live_keys_are_typed() -> None:
    cfg = config_from_dict(
        {
            "decoder": {
                "read_timeout_s": 2,
                "rtsp_transport": "udp",
                "reconnect_initial_s": 0.25,
                "reconnect_max_s": 0.25,  # equal to the initial wait is fine
                "give_up_after_s": 30,
                "video_size": "1280x720",
                "framerate": 30,
                "pixel_format": "mjpeg",
            },
            "encoder": {"device": "auto", "image_size": None},
            "tracker": {"device": "auto", "lost_after_gap_s": 2.5},
            "live": {"mode": "live", "budget_ms": 50},
        }
    )
    d = cfg.decoder
    assert (d.read_timeout_s, d.rtsp_transport, d.reconnect_initial_s, d.reconnect_max_s) == (
        2.0,
        "udp",
        0.25,
        0.25,
    )
    assert isinstance(d.read_timeout_s, float) and isinstance(d.framerate, float)
    assert (d.give_up_after_s, d.video_size, d.framerate, d.pixel_format) == (
        30.0,
        "1280x720",
        30.0,
        "mjpeg",
    )
    assert cfg.encoder.device == "auto" and cfg.encoder.image_size is None
    assert cfg.tracker.device == "auto" and cfg.tracker.lost_after_gap_s == 2.5
    assert cfg.live.mode == "live" and cfg.live.budget_ms == 50.0
    for mode in ("auto", "offline"):
        assert config_from_dict({"live": {"mode": mode}}).live.mode == mode
    # The defaults: auto everything, keep retrying.
    defaults = RunConfig()
    assert defaults.live.mode == "auto" and defaults.live.budget_ms is None
    assert defaults.encoder.device == defaults.tracker.device == "auto"
    assert defaults.encoder.image_size is None and defaults.decoder.give_up_after_s is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"decoder": {"read_timeout_s": 0}}, "decoder.read_timeout_s"),
        ({"decoder": {"rtsp_transport": "http"}}, "decoder.rtsp_transport"),
        ({"decoder": {"reconnect_initial_s": 0}}, "decoder.reconnect_initial_s"),
        ({"decoder": {"reconnect_max_s": -1}}, "decoder.reconnect_max_s"),
        ({"decoder": {"reconnect_initial_s": 3, "reconnect_max_s": 2}}, "decoder.reconnect_max_s"),
        ({"decoder": {"reconnect_initial_s": 3}}, "decoder.reconnect_max_s"),  # default max 2
        ({"decoder": {"give_up_after_s": 0}}, "decoder.give_up_after_s"),
        ({"decoder": {"video_size": "640"}}, "decoder.video_size"),
        ({"decoder": {"video_size": "640x0"}}, "decoder.video_size"),
        ({"decoder": {"video_size": "640X480"}}, "decoder.video_size"),
        ({"decoder": {"framerate": 0}}, "decoder.framerate"),
        ({"decoder": {"pixel_format": "yuyv 422"}}, "decoder.pixel_format"),
        ({"tracker": {"lost_after_gap_s": 0}}, "tracker.lost_after_gap_s"),
        ({"tracker": {"device": "gpu"}}, "tracker.device"),
        ({"live": {"mode": "realtime"}}, "live.mode"),
        ({"live": {"budget_ms": 0}}, "live.budget_ms"),
        ({"live": {"budget_ms": float("nan")}}, "live.budget_ms"),
        ({"encoder": {"device": "automatic"}}, "encoder.device"),
    ],
)
def test_bad_live_values_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^<config>: {re.escape(key)}: must"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"decoder": {"read_timeout_s": None}}, "decoder.read_timeout_s"),
        ({"decoder": {"video_size": [640, 480]}}, "decoder.video_size"),
        ({"decoder": {"framerate": "30"}}, "decoder.framerate"),
        ({"live": {"budget_ms": True}}, "live.budget_ms"),
        ({"live": {"fast": True}}, "live.fast"),
    ],
)
def test_wrong_live_types_are_rejected(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^<config>: {re.escape(key)}: (expected|unknown)"):
        config_from_dict(data)


def test_live_overrides() -> None:
    cfg = load_config(
        overrides=sets(
            "live.mode=live",
            "decoder.video_size=640x480",
            "encoder.image_size=null",
            "decoder.give_up_after_s=60",
        )
    )
    assert cfg.live.mode == "live" and cfg.decoder.video_size == "640x480"
    assert cfg.encoder.image_size is None and cfg.decoder.give_up_after_s == 60.0
    with pytest.raises(
        ConfigError,
        match=r"--set decoder\.reconnect_max_s=0\.1: "
        r"decoder\.reconnect_max_s: must be at least",
    ):
        load_config(overrides=sets("decoder.reconnect_max_s=0.1"))


@pytest.mark.parametrize("path", LIVE_YAMLS, ids=lambda p: p.name)
def test_live_yamls_comment_every_key(path: Path) -> None:
    missing = [
        f"{number}: {line}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#") and " # " not in line
    ]
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", LIVE_YAMLS, ids=lambda p: p.name)
def test_live_yamls_load_and_resolve_to_live(path: Path) -> None:
    from pipeline.run.live import CPU_BUDGET_MS, CPU_LIVE_IMAGE_SIZE, resolve_run_config

    cfg = load_config(path)
    assert cfg.live.mode == "live"
    assert cfg.encoder.image_size is None and cfg.live.budget_ms is None
    assert cfg.encoder.device == cfg.tracker.device == "auto"
    cpu = resolve_run_config(cfg, cuda_available=lambda: False)
    assert cpu.live.mode == "live"
    assert (cpu.encoder.device, cpu.tracker.device) == ("cpu", "cpu")
    assert cpu.encoder.image_size == CPU_LIVE_IMAGE_SIZE and cpu.live.budget_ms == CPU_BUDGET_MS
    gpu = resolve_run_config(cfg, cuda_available=lambda: True)
    assert gpu.encoder.image_size == 1024 and gpu.encoder.device == "cuda"
    validate_config(cpu)
    # With live.mode auto, the camera source alone makes the run live.
    source = "/dev/video0" if path.name == "webcam.yaml" else "rtsp://cam.local/stream"
    auto = load_config(path, sets(f"decoder.source={source}", "live.mode=auto"))
    assert resolve_run_config(auto, cuda_available=lambda: False).live.mode == "live"


def test_webcam_yaml_asks_the_camera_for_its_format() -> None:
    cfg = load_config(CONFIGS / "webcam.yaml")
    assert cfg.decoder.source == "/dev/video0"
    assert cfg.decoder.video_size == "640x480" and cfg.decoder.framerate == 30.0


def test_errors_name_what_gave_the_value(tmp_path: Path) -> None:
    """A bad value is reported with its origin: the option or --set that gave it, else the
    file, also when the run has overrides of other keys."""
    path = write(tmp_path, "encoder:\n  batch_size: 0\n")
    size = Override("encoder.image_size", 512, "--image-size")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: encoder\.batch_size: must"):
        load_config(path, [size])
    with pytest.raises(ConfigError, match=r"^--image-size: encoder\.image_size: must be a posit"):
        load_config(None, [Override("encoder.image_size", 100, "--image-size")])
    # The last override of a key is the one that counts, and the one named.
    late = [size, *sets("encoder.image_size=20")]
    with pytest.raises(ConfigError, match=r"^--set encoder\.image_size=20: encoder\.image_size"):
        load_config(None, late)
    with pytest.raises(ConfigError, match=r"^--image-size: encoder\.image_siz: unknown key"):
        load_config(None, [Override("encoder.image_siz", 512, "--image-size")])


def test_run_options_become_config_values() -> None:
    from pipeline.cli import build_parser, run_config_from_args

    def run_config(*argv: str) -> RunConfig:
        return run_config_from_args(build_parser().parse_args(["run", *argv]))

    cfg = run_config(
        *("--source", "clip.mp4", "--box", "1", "2", "30", "40", "--max-frames", "9"),
        *("--device", "cpu", "--image-size", "512", "--realtime", "--out", "o", "--resume"),
        *("--set", "encoder.batch_size=2"),
    )
    assert cfg.decoder.source == "clip.mp4" and cfg.decoder.max_frames == 9
    assert cfg.tracker.prompts == (PromptConfig(box=(1.0, 2.0, 30.0, 40.0)),)
    assert cfg.encoder.device == cfg.tracker.device == "cpu" and cfg.encoder.image_size == 512
    assert cfg.live.mode == "live" and cfg.publisher.out == "o" and cfg.resume.enabled
    assert cfg.encoder.batch_size == 2
    assert run_config("--source", "a.mp4") == RunConfig(decoder=DecoderConfig(source="a.mp4"))
    with pytest.raises(ConfigError, match=r"^--box/--point: tracker\.prompts\[0\]\.box: must be"):
        run_config("--box", "30", "2", "1", "40")
    with pytest.raises(ConfigError, match=r"^--max-frames: decoder\.max_frames: must be at least"):
        run_config("--max-frames", "0")
