"""The HTML run report: self-contained, robust to missing data, and it renders in a real headless browser."""

from __future__ import annotations

import html
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd_agents.cli import app
from opd_agents.analysis.report import build_report, find_chromium, run_chromium, screenshot, write_report
from opd_agents.store import write_trajectories
from opd_agents.types import StopReason
from tests.test_analysis import make_traj, make_turn, sample_trajs

runner = CliRunner()
N_PLOTS = 5  # curves, divergence by turn, div/* metrics, stop reasons, tool errors


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run-a"
    run.mkdir()
    rows = [{"step": 0, "eval/success_rate": 0.1, "eval/mean_reward": 0.2}]
    for step in range(1, 5):
        rows.append({"step": step, "loss": 1.0 / step, "rollout/success_rate": 0.1 * step,
                     "rollout/mean_reward": 0.2 * step, "div/d_turn_0": 0.3, "div/d_turn_1": 0.5 + step / 10,
                     "div/d_before_error": 0.4, "div/d_after_error": 1.5, "div/d_no_error": 0.3,
                     "div/cascade_rate": 0.5, "div/truncated_share": 0.25, "div/stop_max_turns": 1})
        if step % 2 == 0:
            rows[-1].update({"eval/success_rate": 0.2 * step, "eval/mean_reward": 0.3 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    write_trajectories(run / "trajectories.jsonl", sample_trajs())
    write_trajectories(run / "eval_trajectories.jsonl", [
        make_traj("e1", 1.0, [make_turn(0, [-1.0], None)]),
        make_traj("e2", 0.0, [make_turn(0, [-1.0], None)], StopReason.max_turns)])
    (run / "config.json").write_text(json.dumps({"env": {"id": "opd_agents/Arithmetic-v0"},
                                                 "loss": {"kind": "reverse_kl"}, "train": {"steps": 4}}))
    (run / "summary.json").write_text(json.dumps({"student_before": 0.1, "student_after": 0.4}))
    return run


def external_refs(text: str) -> list[str]:
    """Every src/href/url() that is not a same-document '#fragment' or a data: URI."""
    refs = re.findall(r"""(?:\bsrc|\bhref)\s*=\s*["']?([^"'\s>]*)""", text) + re.findall(r"url\(([^)]*)\)", text)
    return [r for r in refs if not r.strip("'\" ").startswith(("#", "data:"))]


def test_report_contents(run_dir: Path, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    text = build_report(run_dir, trajectories=2, tokenizer=smollm2_tokenizer_dir)
    assert external_refs(text) == []
    # Namespace declarations are names, not fetched; nothing else may mention a web address.
    assert not re.search(r"https?://", re.sub(r'xmlns(:\w+)?="[^"]*"', "", text))
    assert "<script" not in text and "<link" not in text and "<img" not in text
    assert text.count("<svg") == N_PLOTS and 'class="nodata"' not in text
    assert "skipped 1 unreadable line(s) in metrics.jsonl" in text
    assert "<th>environment</th><td>opd_agents/Arithmetic-v0</td>" in text
    assert "<th>summary: student_after</th><td>0.4</td>" in text
    # divergence by turn: b (tool error at turn 1) vs a (clean)
    assert "<td>with_error</td><td>k=0: 0.500 (n=1)</td><td>k=1: 1.000 (n=1)</td><td>k=2: 2.000 (n=1)</td>" in text
    assert "<li>train: 4 episodes, 75.0% truncated;" in text and "parse_error 1 (truncation)" in text
    assert "train: 6 tool calls, 2 errors, held-out eval: 2 tool calls, 0 errors" in text
    # heatmap: the 2 most divergent training trajectories, most divergent first, decoded tokens
    assert text.count('<div class="traj">') == 2
    assert text.index("<b>b</b>") < text.index("<b>a</b>") and "<b>c</b>" not in text
    assert 'style="background:rgb(255, 0, 0)" title="student -0.50 teacher -2.50 ratio -2.00"' in text
    piece = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).decode([120])  # b's turn 2, first token
    assert f'ratio -2.00">{html.escape(piece)}</span>' in text
    assert '<span class="err">[execution_failed]</span> calculator: Tool execution failed' in text


def test_report_without_data(tmp_path: Path) -> None:
    text = build_report(tmp_path)
    assert "<svg" not in text and text.count('class="nodata"') == 6
    assert "<th>train trajectories</th><td>no file</td>" in text


def test_report_without_tokenizer_shows_ids(run_dir: Path, tmp_path: Path) -> None:
    text = build_report(run_dir, trajectories=1, tokenizer=tmp_path / "missing")
    assert text.count('<div class="traj">') == 1 and "showing token ids" in text and "ratio -2.00\">⟨120⟩" in text


def test_report_cli(run_dir: Path, tmp_path: Path) -> None:
    with (run_dir / "trajectories.jsonl").open("a") as f:
        f.write("not json\n")
    result = runner.invoke(app, ["report", str(run_dir), "--trajectories", "0"])
    assert result.exit_code == 0, result.output
    text = (run_dir / "report.html").read_text()
    assert f"skipped {run_dir / 'trajectories.jsonl'}:5: invalid JSON" in text
    assert "no data: no trajectories with teacher logprobs" in text  # --trajectories 0
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.stdout
    record = json.loads((run_dir / "eval_trajectories.jsonl").read_text().splitlines()[0])
    (run_dir / "eval_trajectories.jsonl").write_text(json.dumps({**record, "schema_version": 7}) + "\n")
    newer = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "r.html")])
    assert newer.exit_code == 2 and "schema_version 7 is newer" in newer.stdout
    assert not (tmp_path / "r.html").exists()


class SvgCounter(HTMLParser):
    """Counts <svg> elements and, per svg, its <path> descendants."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[int] = []
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            if self.depth == 0:
                self.paths.append(0)
            self.depth += 1
        elif tag == "path" and self.depth:
            self.paths[-1] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.depth -= 1


def require_chromium() -> None:
    if find_chromium() is None:
        msg = "chromium is not installed (apt-get install -y chromium); the headless report test needs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    require_chromium()
    page = write_report(run_dir, tmp_path / "report.html", trajectories=2, tokenizer=tmp_path / "no-tokenizer")
    dom = run_chromium(["--dump-dom", page.as_uri()]).stdout
    counter = SvgCounter()
    counter.feed(dom)
    assert len(counter.paths) == N_PLOTS and min(counter.paths) >= 5, counter.paths
    assert dom.count('class="tok"') >= 10
    png = screenshot(page, tmp_path / "report.png", width=1280, height=6000)
    assert png.stat().st_size > 50_000
    with Image.open(png) as img:
        # cropped below the content: taller than the plots need, shorter than the window
        assert img.width == 1280 and 2400 < img.height < 6000
        rgb = img.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 200  # lines, bars, heatmap cells, anti-aliased text
        # Every 400-px band of the page has drawn (non-white) pixels: the plots are not blank boxes.
        for top in range(0, img.height - 400, 400):
            band = rgb.crop((0, top, 1280, top + 400))
            assert band.getextrema() != ((255, 255), (255, 255), (255, 255)), f"blank band at y={top}"
