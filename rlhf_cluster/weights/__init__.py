"""The weight path: how a policy version leaves the learner and reaches every generation engine.

- `store`: the versioned weight store on disk (manifests, checksums, atomic LATEST, retention).
- `buckets`: a version as layer-aligned, checksummed buckets of engine-dtype bytes, and the
  fingerprint an engine proves its load with.
- `transports`: one class per transport (`weights.transport.type`), each with the learner's
  publishing side and the engine's loading side; the actors call them and know no transport.
- `sparse_delta`: a version as the elements changed since the previous one (`delta: sparse`).

May import: torch, numpy, safetensors, blake3 and `rlhf_cluster` (config, generation.quantization,
fileio); never ray (the actors hand in the object store's put/get).
"""

from rlhf_cluster.weights.store import MANIFEST, WeightIntegrityError, WeightStore

__all__ = ["MANIFEST", "WeightIntegrityError", "WeightStore"]
