"""A loopback server in OpenEnv's wire format, for tests/test_env_openenv.py (``openenv-core`` itself cannot
be installed here). It follows ``openenv/core/env_server/http_server.py`` and ``types.py`` (meta-pytorch/
OpenEnv): FastAPI routes ``POST /reset``, ``POST /step`` (a fresh env instance per request, 422 with
pydantic's errors for a bad action), ``GET /state``, ``GET /health``, ``GET /schema`` and the ``/ws``
session (one env per connection, ``{"type", "data"}`` messages, ``error`` replies with a code, at most
``max_sessions`` sessions). The request/response models below are written after theirs.

    python tests/openenv_server.py {echo|counter|calc} PORT [MAX_SESSIONS]
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sys
import time
from typing import Any, Literal

import uvicorn
from fastapi import Body, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError


# ---- openenv's base types ---------------------------------------------------------------------------
class Action(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Additional metadata for the action")


class Observation(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    done: bool = False
    reward: bool | int | float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class State(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    episode_id: str | None = None
    step_count: int = Field(default=0, ge=0)


class ResetRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    seed: int | None = Field(default=None, ge=0)
    episode_id: str | None = Field(default=None, max_length=255)


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: dict[str, Any]
    timeout_s: float | None = Field(default=None, gt=0)
    request_id: str | None = Field(default=None, max_length=255)


class StepResponse(BaseModel):  # ResetResponse has the same fields
    model_config = ConfigDict(extra="forbid")
    observation: dict[str, Any]
    reward: float | None = None
    done: bool = False


# MCP actions (mcp_types.py), routed before the env's own action class as serialization.deserialize_action does.
class ListToolsAction(Action):
    type: Literal["list_tools"] = "list_tools"


class CallToolAction(Action):
    type: Literal["call_tool"] = "call_tool"
    tool_name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error_type: str  # execution_error | invalid_args | transport_error | tool_not_found | timeout
    message: str


class ListToolsObservation(Observation):
    tools: list[dict[str, Any]]


class CallToolObservation(Observation):
    tool_name: str
    result: Any = None
    error: ToolError | None = None


MCP_ACTIONS: dict[str, type[Action]] = {"list_tools": ListToolsAction, "call_tool": CallToolAction}


def deserialize_action(data: dict[str, Any], action_cls: type[Action]) -> Action:
    kind = data.get("type")
    if kind in MCP_ACTIONS and (action_cls is Action or action_cls in MCP_ACTIONS.values()):
        return MCP_ACTIONS[kind].model_validate(data)
    return action_cls.model_validate(data)


def serialize_observation(obs: Observation) -> dict[str, Any]:
    return {"observation": obs.model_dump(exclude={"reward", "done", "metadata"}), "reward": obs.reward,
            "done": obs.done}


# ---- two environments -------------------------------------------------------------------------------
class EchoAction(Action):
    """Say something; the environment echoes it."""

    message: str = Field(min_length=1, description="what to say")


class EchoObservation(Observation):
    echoed_message: str
    message_length: int = 0


class EchoEnv:
    """Stateless apart from a step count: each step's reward is 0.1 per character."""

    action_cls, observation_cls = EchoAction, EchoObservation

    def __init__(self) -> None:
        self.state = State()

    def reset(self, seed: int | None = None, episode_id: str | None = None) -> EchoObservation:
        self.state = State(episode_id=episode_id)
        return EchoObservation(echoed_message="Echo env ready!")

    def step(self, action: EchoAction) -> EchoObservation:
        self.state.step_count += 1
        n = len(action.message)
        return EchoObservation(echoed_message=action.message, message_length=n, reward=0.1 * n)

    def close(self) -> None:
        pass


class CounterAction(Action):
    """Add to the counter."""

    amount: int = Field(ge=1, le=5, description="how much to add (1-5)")
    delay_s: float = Field(default=0.0, ge=0, description="seconds the step takes")
    fail: bool = Field(default=False, description="make the step raise")


class CounterObservation(Observation):
    count: int
    target: int
    message: str


class CounterEnv:
    """Count up to the target exactly: reward 1 and done on it, done without reward past it."""

    action_cls, observation_cls = CounterAction, CounterObservation

    def __init__(self) -> None:
        self.state = State()
        self.count = self.target = 0

    def reset(self, seed: int | None = None, episode_id: str | None = None, target: int | None = None,
              **kwargs: Any) -> CounterObservation:
        self.state = State(episode_id=episode_id, prompt=kwargs.get("prompt"))
        self.count, self.target = 0, target if target is not None else (seed or 0) % 7 + 3
        return CounterObservation(count=0, target=self.target, message=f"Count to {self.target}.")

    def step(self, action: CounterAction) -> CounterObservation:
        if action.fail:
            raise RuntimeError("the counter jammed")
        time.sleep(action.delay_s)
        self.state.step_count += 1
        self.count += action.amount
        if self.count == self.target:
            return CounterObservation(count=self.count, target=self.target, message="Exactly!", reward=1.0, done=True)
        if self.count > self.target:
            return CounterObservation(count=self.count, target=self.target, message="Overshot.", reward=0.0, done=True)
        return CounterObservation(count=self.count, target=self.target, message=f"At {self.count}.", reward=0.0)

    def close(self) -> None:
        pass


def tool_result(value: Any) -> dict[str, Any]:
    """A fastmcp CallToolResult as it reaches the wire (a dataclass dumped by pydantic)."""
    return {"content": [{"type": "text", "text": str(value), "annotations": None, "meta": None}],
            "structured_content": {"result": value}, "meta": None, "data": value, "is_error": False}


class CalcEnv:
    """An MCPEnvironment-style env: tools add, divide and submit (reward 1 and done on the right answer)."""

    action_cls, observation_cls = CallToolAction, CallToolObservation
    TOOLS = [
        {"name": "add", "description": "Add two integers.", "input_schema": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}},
        {"name": "divide", "description": "Divide a by b.", "input_schema": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}},
        {"name": "submit", "description": "Submit the final answer.", "input_schema": {
            "type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]}},
    ]

    def __init__(self) -> None:
        self.state = State()
        self.answer: float | None = None

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> Observation:
        self.state = State(episode_id=episode_id)
        self.answer = kwargs.get("answer")
        return Observation()

    def step(self, action: Action) -> Observation:
        if isinstance(action, ListToolsAction):
            return ListToolsObservation(tools=self.TOOLS)
        assert isinstance(action, CallToolAction)
        self.state.step_count += 1
        name, args = action.tool_name, action.arguments
        try:
            if name == "add":
                return CallToolObservation(tool_name=name, result=tool_result(args["a"] + args["b"]))
            if name == "divide":
                return CallToolObservation(tool_name=name, result=tool_result(args["a"] / args["b"]))
            if name == "submit":
                right = args["answer"] == self.answer
                return CallToolObservation(tool_name=name, result=tool_result("right" if right else "wrong"),
                                           reward=1.0 if right else 0.0, done=True)
        except Exception as e:  # noqa: BLE001 - as MCPEnvironment: the tool's exception is a ToolError
            return CallToolObservation(tool_name=name, error=ToolError(error_type="execution_error", message=str(e)))
        return CallToolObservation(tool_name=name, error=ToolError(error_type="tool_not_found",
                                                                   message=f"Tool '{name}' not found"))

    def close(self) -> None:
        pass


# ---- the server ---------------------------------------------------------------------------------------
def valid_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """http_server._get_valid_kwargs: only what the function accepts (everything with **kwargs)."""
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if k in params or var_kw}


def create_app(env_cls: type, max_sessions: int = 1) -> FastAPI:
    app = FastAPI()
    sessions: set[int] = set()

    @app.post("/reset")
    async def reset(request: ResetRequest = Body(default_factory=ResetRequest)) -> StepResponse:
        env = env_cls()
        try:
            kwargs = valid_kwargs(env.reset, request.model_dump(exclude_unset=True))
            return StepResponse(**serialize_observation(await asyncio.to_thread(env.reset, **kwargs)))
        finally:
            env.close()

    @app.post("/step")
    async def step(request: StepRequest) -> StepResponse:
        try:
            action = deserialize_action(request.action, env_cls.action_cls)
        except ValidationError as e:
            raise HTTPException(status_code=422, detail=e.errors(include_url=False)) from None
        env = env_cls()
        try:
            return StepResponse(**serialize_observation(await asyncio.to_thread(env.step, action)))
        finally:
            env.close()

    @app.get("/state")
    def state() -> dict[str, Any]:
        return env_cls().state.model_dump()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.get("/schema")
    def schema() -> dict[str, Any]:
        return {"action": env_cls.action_cls.model_json_schema(),
                "observation": env_cls.observation_cls.model_json_schema(), "state": State.model_json_schema()}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        if len(sessions) >= max_sessions:
            await websocket.send_text(json.dumps({"type": "error", "data": {
                "message": f"Server at capacity ({len(sessions)}/{max_sessions} sessions)",
                "code": "CAPACITY_REACHED", "active_sessions": len(sessions), "max_sessions": max_sessions}}))
            await websocket.close()
            return
        env = env_cls()
        sessions.add(id(env))
        try:
            while True:
                message = json.loads(await websocket.receive_text())
                kind, data = message.get("type", ""), message.get("data") or {}
                try:
                    if kind == "reset":
                        obs = await asyncio.to_thread(env.reset, **valid_kwargs(env.reset, data))
                        reply = {"type": "observation", "data": serialize_observation(obs)}
                    elif kind == "step":
                        action = deserialize_action(data, env_cls.action_cls)
                        reply = {"type": "observation",
                                 "data": serialize_observation(await asyncio.to_thread(env.step, action))}
                    elif kind == "state":
                        reply = {"type": "state", "data": env.state.model_dump()}
                    elif kind == "close":
                        break
                    else:
                        reply = {"type": "error", "data": {"message": f"Unknown message type: {kind}",
                                                           "code": "UNKNOWN_TYPE"}}
                except ValidationError as e:
                    reply = {"type": "error", "data": {"message": "Invalid message", "code": "VALIDATION_ERROR",
                                                       "errors": e.errors(include_url=False)}}
                except Exception as e:  # noqa: BLE001 - as http_server: the error goes back to the client
                    reply = {"type": "error", "data": {"message": str(e), "code": "EXECUTION_ERROR"}}
                await websocket.send_text(json.dumps(reply, default=str))
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client left (maybe while a step ran)
            pass
        finally:
            sessions.discard(id(env))
            env.close()
        with contextlib.suppress(RuntimeError, OSError):  # already closed by the client
            await websocket.close()

    return app


if __name__ == "__main__":
    env_cls = {"echo": EchoEnv, "counter": CounterEnv, "calc": CalcEnv}[sys.argv[1]]
    max_sessions = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    uvicorn.run(create_app(env_cls, max_sessions), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                ws="websockets-sansio")
