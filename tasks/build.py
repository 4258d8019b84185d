"""Legacy name, kept for one release: versions registered before the house move carry a pyfunc model whose code
does ``from tasks.build import backend, verify_artifact`` at load. New code imports tasks.backends and
tasks.profiles (README "Changelog")."""

from tasks.backends import get as backend
from tasks.profiles.profile import verify_artifact

__all__ = ["backend", "verify_artifact"]
