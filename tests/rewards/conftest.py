"""Fixtures for reward and judge tests: a tiny PNG, item batches, a loopback OpenAI-compatible server."""

import io

import pytest
from PIL import Image

from balcap_jax.rewards.types import RewardItem
from tests.rewards.rewards_fake_server import FakeOpenAIServer, ServerSpec


def png_bytes(color: str = "red", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def group_caption(p: int, g: int) -> str:
    kind = g % 4
    if kind == 0:
        return f"A brown dog lies on green grass. A purple dragon flies above number {p} {g}."
    if kind == 1:
        return f"A brown dog dog lies on grass near a wooden fence, dog{p} {g}. The mood is peaceful."
    if kind == 2:
        return f"Scene {p}-{g}. A brown dog lies on green grass. A wooden fence stands behind the dog{p}."
    return ""


def make_groups(num_prompts: int, group_size: int) -> list[list[RewardItem]]:
    """P groups of G captions (every fourth one empty); captions vary so every component's value varies."""
    image = png_bytes()
    groups = []
    for p in range(num_prompts):
        reference = f"A brown dog lies on green grass. A wooden fence stands behind the dog{p}."
        groups.append([RewardItem(f"img{p}", group_caption(p, g), (reference,), image) for g in range(group_size)])
    return groups


@pytest.fixture
def png():
    return png_bytes()


@pytest.fixture
def fake_server():
    """Factory: fake_server(ServerSpec(...)) -> a started FakeOpenAIServer, stopped at teardown."""
    servers = []

    def start(spec: ServerSpec = ServerSpec()) -> FakeOpenAIServer:
        servers.append(FakeOpenAIServer(spec).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
