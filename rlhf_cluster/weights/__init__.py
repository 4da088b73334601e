"""The weight path: how a policy version leaves the learner and reaches every generation engine.

- `store`: the versioned weight store on disk (manifests, checksums, atomic LATEST, retention).
- `buckets`: a version as layer-aligned, checksummed buckets of engine-dtype bytes, and the
  fingerprint an engine proves its load with.
- `transports`: the interface every transport has (the learner's publishing side, the engine's
  loading side), the store directory's (`filesystem`) and the object store's (`direct`).
- `collective`: a broadcast group of the learner's rank 0 and the engines (`collective`: nccl, gloo).
- `registry`: the class for each `weights.transport.type`; the actors call it and know no transport.
- `sparse_delta`: a version as the elements changed since the previous one (`delta: sparse`).
- `shares`: every learner rank sends its share of a version (`Dealer`, `merge_publications`).
- `messages`: the typed messages (Publication, Delivery, Receipt and their parts).

May import: torch (torch.distributed: groups it builds itself, never the default one), numpy,
safetensors, blake3 and `rlhf_cluster` (config, models.quantization, fileio); never ray (the
actors hand in the object store's put/get).
"""

from rlhf_cluster.weights.store import MANIFEST, WeightIntegrityError, WeightStore

__all__ = ["MANIFEST", "WeightIntegrityError", "WeightStore"]
