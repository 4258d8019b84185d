"""Every registered backend exports the whole contract (tasks/backends/__init__.py `Backend`)."""

import typing

import pytest

from tasks import backends


@pytest.mark.parametrize("name", sorted(backends.BACKENDS))
def test_each_backend_declares_the_contract(name):
    face = backends.get(name)
    wanted = {n for n in typing.get_type_hints(backends.Backend)} | {
        n for n, v in vars(backends.Backend).items() if callable(v) and not n.startswith("_")}
    assert wanted - set(dir(face)) == set()
    assert face.NAME == name and face.CHECKPOINT_KIND in ("fakequant", "unified")
    with face.TARGET_LOCK:  # a context manager (vllm: a lock; the others: nothing to wait for)
        pass


def test_vllm_targets_run_one_after_another():
    lock = backends.get("vllm").TARGET_LOCK
    with lock:
        assert not lock.acquire(blocking=False)  # a second vllm target waits for the first
