"""Derived files from a trajectory JSONL, all written by streaming and moved into place atomically:
Parquet (pyarrow, in record batches), Hugging Face ``datasets`` (``save_to_disk``), a ``datasets.Dataset``
in TRL's conversational format with tools, and re-scored copies (another teacher's logprobs and d_k,
without re-running the environment; the source file is never touched).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from opd_agents.analysis.trajectories import Level, TrajectoryFilter, iter_filtered, iter_records
from opd_agents.env.parsers import ToolCallParser, get_parser
from opd_agents.store import ReadIssue, write_trajectories
from opd_agents.types import ErrorType, Trajectory

if TYPE_CHECKING:  # torch/transformers/datasets stay unimported for plain exports
    from datasets import Features

    from opd_agents.teacher import Teacher

_ids = pa.list_(pa.int32())  # vocabularies stay far below 2**31
_floats = pa.list_(pa.float64())  # float64: the JSON store's logprobs round-trip exactly
_message = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string()),
                      ("tool_call_id", pa.string())])

# Field names are the keys of analysis.trajectory_record / iter_turns (a test keeps them in step).
TRAJECTORY_SCHEMA = pa.schema([
    ("id", pa.string()), ("schema_version", pa.int32()), ("created_at", pa.string()), ("env_id", pa.string()),
    ("task_id", pa.string()), ("seed", pa.int64()), ("split", pa.string()), ("model_id", pa.string()),
    ("teacher_id", pa.string()), ("reward", pa.float64()), ("success", pa.bool_()), ("terminated", pa.bool_()),
    ("truncated", pa.bool_()), ("stop_reason", pa.string()), ("num_turns", pa.int32()),
    ("num_assistant_tokens", pa.int64()), ("num_tokens", pa.int64()), ("num_tool_calls", pa.int32()),
    ("num_tool_errors", pa.int32()), ("first_error_turn", pa.int32()), ("error_types", pa.list_(pa.string())),
    ("max_divergence", pa.float64()), ("mean_divergence", pa.float64()), ("messages", pa.list_(_message)),
    ("prompt_ids", _ids), ("token_ids", pa.list_(_ids)), ("sampling_logprobs", pa.list_(_floats)),
    ("teacher_logprobs", pa.list_(_floats)), ("observation_ids", pa.list_(_ids)),
    ("turn_divergence", _floats), ("turn_weight", _floats),
])
TURN_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("env_id", pa.string()), ("task_id", pa.string()), ("seed", pa.int64()),
    ("split", pa.string()), ("reward", pa.float64()), ("success", pa.bool_()), ("stop_reason", pa.string()),
    ("turn", pa.int32()), ("finish", pa.string()), ("text", pa.string()), ("num_tokens", pa.int32()),
    ("tool_calls", pa.list_(pa.string())), ("error_types", pa.list_(pa.string())), ("has_tool_error", pa.bool_()),
    ("first_error_turn", pa.int32()), ("after_error", pa.bool_()), ("divergence", pa.float64()),
    ("weight", pa.float64()), ("teacher_id", pa.string()), ("token_ids", _ids), ("sampling_logprobs", _floats),
    ("teacher_logprobs", _floats), ("observation_ids", _ids),
])
SCHEMAS: dict[str, pa.Schema] = {"trajectory": TRAJECTORY_SCHEMA, "turn": TURN_SCHEMA}
ROWS_PER_CHUNK = 64  # Python rows converted to Arrow at a time (as Python objects they are ~5x larger)
ROW_GROUP_BYTES = 32 << 20  # Arrow bytes gathered into one Parquet row group


def schema_for(level: Level) -> pa.Schema:
    if level not in SCHEMAS:
        raise ValueError(f"level must be 'trajectory' or 'turn', got {level!r}")
    return SCHEMAS[level]


def check_distinct(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Refuse to write a derived file over its own source (symlinks and hard links included)."""
    src_p, out_p = Path(src), Path(out)
    if out_p.resolve() == src_p.resolve() or (out_p.exists() and os.path.samefile(src_p, out_p)):
        raise ValueError(f"--out {out} is the input file itself; write to a new path (the input is never modified)")


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(islice(rows, size)):
        yield batch


def write_parquet(rows: Iterable[dict[str, Any]], out: str | os.PathLike[str], schema: pa.Schema,
                  row_group_bytes: int = ROW_GROUP_BYTES) -> int:
    """Write flat records to ``out``, ROWS_PER_CHUNK rows at a time, one row group per ~``row_group_bytes``
    of Arrow data (memory stays bounded by that, whatever the file size); returns the row count."""
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_p.name}.", suffix=".tmp", dir=out_p.parent)
    os.close(fd)
    n = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            pending: list[pa.RecordBatch] = []
            for chunk in _batches(iter(rows), ROWS_PER_CHUNK):
                pending.append(pa.RecordBatch.from_pylist(chunk, schema=schema))
                n += len(chunk)
                if sum(b.nbytes for b in pending) >= row_group_bytes:
                    writer.write_table(pa.Table.from_batches(pending, schema=schema))
                    pending = []
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema=schema))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def export_parquet(src: str | os.PathLike[str], out: str | os.PathLike[str], *, level: Level = "trajectory",
                   flt: TrajectoryFilter | None = None,
                   on_error: Callable[[ReadIssue], None] | None = None) -> int:
    check_distinct(src, out)
    return write_parquet(iter_records(iter_filtered(src, flt, on_error=on_error), level), out, schema_for(level))


def export_hf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, level: Level = "trajectory",
              flt: TrajectoryFilter | None = None, on_error: Callable[[ReadIssue], None] | None = None) -> int:
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (load it with ``datasets.load_from_disk``).
    ``out`` must be new or a previous dataset export, which is replaced only once the new one is complete."""
    from datasets import Features

    return _save_dataset(lambda staged: export_parquet(src, staged, level=level, flt=flt, on_error=on_error),
                         out, Features.from_arrow_schema(schema_for(level)))


def _save_dataset(stage: Callable[[Path], int], out: str | os.PathLike[str], features: Features) -> int:
    """``stage(path)`` writes the rows as Parquet; they become a dataset with ``features`` at ``out``."""
    from datasets import Dataset

    out_p = Path(out)
    if out_p.exists() and not (out_p / "dataset_info.json").is_file():
        raise ValueError(f"--out {out} exists and is not a saved dataset; choose a new directory")
    out_p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_p.name}.", dir=out_p.parent) as tmp:
        # Streamed through Parquet first: datasets then converts file to file (never the rows in memory),
        # and no reader callback has to go through its pickling of generator arguments.
        staged_parquet = Path(tmp) / "rows.parquet"
        n = stage(staged_parquet)
        ds = Dataset.from_parquet(str(staged_parquet), features=features, cache_dir=str(Path(tmp) / "cache"))
        staged = Path(tmp) / "dataset"
        ds.save_to_disk(str(staged))
        del ds  # drop the memory maps into the cache before it is deleted
        if out_p.exists():
            shutil.rmtree(out_p)
        os.replace(staged, out_p)
    return n


# ---- TRL: conversational format with tools ---------------------------------------------------------
# TRL's documented tool-calling rows: {"messages": [...], "tools": [json schemas]} (language modeling) or
# {"prompt": [...], "completion": [...], "tools": [...]} (prompt-completion; GRPO reads "prompt"). Each message
# and tool is a datasets ``Json()`` value: stored exactly as the chat template takes it (no None-filled keys,
# which break templates that test ``'tool_calls' in message``; arguments stay objects of any shape).
_TRL_META = [("id", pa.string()), ("env_id", pa.string()), ("task_id", pa.string()), ("seed", pa.int64()),
             ("reward", pa.float64()), ("success", pa.bool_()), ("stop_reason", pa.string())]
_json_list = pa.list_(pa.string())  # staged as JSON text; typed List(Json()) in the dataset
TRL_SCHEMAS: dict[str, pa.Schema] = {
    "trajectory": pa.schema([("messages", _json_list), ("tools", _json_list), *_TRL_META]),
    "turn": pa.schema([("prompt", _json_list), ("completion", _json_list), ("tools", _json_list), *_TRL_META,
                       ("turn", pa.int32())]),
}
TRL_JSON_COLUMNS = ("messages", "prompt", "completion", "tools")


def call_marker(parser: ToolCallParser) -> str:
    """Where a call starts in ``parser``'s format: what ``format_call`` writes before the call's JSON or
    name (``<tool_call>``, ```` ```tool_call ````, ``Action:``, ``[TOOL_CALLS]``; "" when the call is the
    whole message)."""
    text = parser.format_call("NAME", {})
    return text[:min(i for i in (text.find("{"), text.find("NAME")) if i >= 0)].rstrip("[ \n")


def chat_messages(traj: Trajectory, parser: str | ToolCallParser = "hermes") -> list[dict[str, Any]]:
    """The episode as chat-template messages (transformers / OpenAI structure). An assistant turn's parsed
    calls become ``tool_calls`` = [{"id", "type": "function", "function": {"name", "arguments"}}] and leave
    its ``content`` (the text before the first call stays); tool results are ``tool`` messages with ``name``
    and ``tool_call_id``. A turn with a malformed call keeps its text as written and gets no ``tool_calls``
    (the model's output did not parse; the tool message says why). ``parser``: the format the episode was
    played in (the env's ``parser``)."""
    marker = call_marker(get_parser(parser) if isinstance(parser, str) else parser)
    turns = iter(traj.turns)  # the i-th assistant message is the i-th turn's text
    out: list[dict[str, Any]] = []
    for m in traj.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            turn = next(turns, None)
            if turn is not None and turn.tool_calls and ErrorType.parse_error not in turn.tool_error_types:
                cut = m.content.find(marker)
                msg["content"] = m.content[:cut].strip() if cut >= 0 else m.content
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in turn.tool_calls]
        elif m.role == "tool":
            msg.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
        out.append(msg)
    return out


def trl_rows(trajs: Iterable[Trajectory], level: Level = "trajectory",
             parser: str | ToolCallParser = "hermes") -> Iterator[dict[str, Any]]:
    """Rows of ``TRL_SCHEMAS[level]`` (JSON columns as JSON text): one per episode (``messages``), or one
    per assistant turn (``prompt`` = the conversation before it, ``completion`` = the turn)."""
    parser = get_parser(parser) if isinstance(parser, str) else parser
    for traj in trajs:
        messages = [json.dumps(m) for m in chat_messages(traj, parser)]
        meta = {"tools": [json.dumps(t) for t in traj.tool_schemas], "id": traj.id, "env_id": traj.env_id,
                "task_id": traj.task_id, "seed": traj.seed, "reward": traj.reward, "success": traj.success,
                "stop_reason": traj.stop_reason.value if traj.stop_reason else None}
        if level == "trajectory":
            yield {"messages": messages, **meta}
            continue
        assistant = [i for i, m in enumerate(traj.messages) if m.role == "assistant"]
        for k, i in enumerate(assistant):
            yield {"prompt": messages[:i], "completion": [messages[i]], **meta, "turn": k}


def trl_features(level: Level) -> Features:
    from datasets import Features, Json, List

    if level not in TRL_SCHEMAS:
        raise ValueError(f"level must be 'trajectory' or 'turn', got {level!r}")
    features = Features.from_arrow_schema(TRL_SCHEMAS[level])
    for name in TRL_JSON_COLUMNS:
        if name in features:
            features[name] = List(Json())
    return features


def export_trl(src: str | os.PathLike[str], out: str | os.PathLike[str], *, level: Level = "trajectory",
               flt: TrajectoryFilter | None = None, parser: str = "hermes",
               on_error: Callable[[ReadIssue], None] | None = None) -> int:
    """A ``datasets.Dataset`` (``save_to_disk``) that TRL's SFT / GRPO trainers read as it is: ``messages``
    and ``tools`` per episode, or ``prompt`` / ``completion`` / ``tools`` per turn (``level="turn"``), plus
    the episode's id, env, task, seed, reward, success and stop reason. ``flt=TrajectoryFilter(success=True)``
    keeps the successful episodes (SFT data)."""
    check_distinct(src, out)
    features = trl_features(level)  # checks the level before any work
    get_parser(parser)  # and the parser name

    def stage(staged: Path) -> int:
        rows = trl_rows(iter_filtered(src, flt, on_error=on_error), level, parser)
        return write_parquet(rows, staged, TRL_SCHEMAS[level])

    return _save_dataset(stage, out, features)


# ---- re-scoring ------------------------------------------------------------------------------------
def rescore(trajs: Iterable[Trajectory], teacher: Teacher, *, batch_size: int = 8,
            top_k: int = 0) -> Iterator[Trajectory]:
    """Score trajectories chunk by chunk with ``teacher`` and yield them with the new teacher logprobs and
    recomputed per-turn telemetry (d_k, reverse KL; top-k mass and entropy with ``top_k``). A d_k left
    from the old teacher never survives: ``annotate_turns`` recomputes it. Turn weights are left as they
    were (they come from the training run's divergence policy)."""
    from opd_agents.training.divergence import annotate_turns  # imports torch; plain exports do not need it

    it = iter(trajs)
    while chunk := list(islice(it, batch_size)):
        scores = teacher.score_and_apply(chunk, top_k=top_k)
        for traj, s in zip(chunk, scores, strict=True):
            annotate_turns(traj, s.topk_logprobs if top_k else None)
            yield traj


def rescore_file(src: str | os.PathLike[str], out: str | os.PathLike[str], teacher: Teacher, *,
                 batch_size: int = 8, top_k: int = 0, on_error: Callable[[ReadIssue], None] | None = None) -> int:
    """Write a re-scored copy of ``src`` to ``out`` (atomically: a failed teacher leaves no partial file)."""
    check_distinct(src, out)
    return write_trajectories(out, rescore(iter_filtered(src, on_error=on_error), teacher,
                                           batch_size=batch_size, top_k=top_k))
