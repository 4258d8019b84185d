"""The content-addressed artifact store (the ground floor): ``from tasks import store`` and call ``store.X``.

Every stage writes to ``<home>/<stage>/<key>/`` where the key hashes everything its output depends on. A directory
appears only complete: it is written under a temporary name, ``manifest.json`` last, then renamed into place. The
manifest records every file's size and SHA-256 (computed once, when written); reuse checks them (a damaged entry is
rebuilt, never reused) and loading a profile or a registry download checks the digests.

This face only hands names on; the parts below it (paths → digests → keys → artifacts) never import it.
"""

from tasks.store.artifacts import (
                                   ArtifactDamaged,
                                   Remote,
                                   artifact_root,
                                   atomic_dir,
                                   check,
                                   claim,
                                   entries,
                                   fingerprint_of,
                                   link_or_copy,
                                   link_or_copy_tree,
                                   lock,
                                   manifest_records_under,
                                   read_manifest,
                                   reuse,
                                   reuse_or_make,
                                   set_remote,
                                   sweep_temporaries,
                                   temporary_sibling,
                                   verify,
                                   verify_store,
                                   write_manifest,
)
from tasks.store.digests import HashingWriter, cached_sha256, digest_files, remember, sha256_file, write_bytes
from tasks.store.keys import fingerprint_dir, key_of, package_digest, source_digest, source_dir_digest
from tasks.store.paths import MANIFEST, home, stage_dir

__all__ = ["MANIFEST", "ArtifactDamaged", "HashingWriter", "Remote", "artifact_root", "atomic_dir", "cached_sha256",
           "check", "claim", "digest_files", "entries", "fingerprint_dir", "fingerprint_of", "home", "key_of",
           "link_or_copy", "link_or_copy_tree",
           "lock", "manifest_records_under", "package_digest", "read_manifest", "remember", "reuse", "reuse_or_make",
           "set_remote",
           "sha256_file", "source_digest", "source_dir_digest", "stage_dir", "sweep_temporaries",
           "temporary_sibling", "verify", "verify_store", "write_bytes", "write_manifest"]
