"""Conformance cases for every method: a test fails if a registered method has none.

Each case: a spec, and the largest relative MSE its post hoc fit may leave on the synthetic
matrix of ``synthetic_table`` (rows near a 6-dim subspace plus noise, 256 x 24).
"""

CASES: dict[str, list[tuple[str, float]]] = {
    "hash": [("hash:buckets=64", 0.9), ("hash:buckets=40,hash=universal", 0.95)],
    "scalar": [("scalar:bits=8", 1e-3), ("scalar:bits=4", 0.05), ("scalar:bits=16", 1e-5),
               ("scalar:bits=4,block=8", 0.03), ("scalar:bits=3,block=16,offset=true", 0.08),
               ("scalar:bits=2,block=5", 0.4), ("scalar:bits=8,block=32,offset=true", 1e-3)],
    "lowrank": [("lowrank:rank=6", 0.1)],
    "distilled": [("distilled:rank=8", 0.3), ("distilled:rank=8,activation=tanh", 0.3)],
    "dpq": [("dpq:variant=sx,groups=4,codewords=8", 0.5), ("dpq:variant=vq,groups=6,codewords=16", 0.5),
            ("dpq:variant=sx,groups=4,codewords=8,shared=true,batchnorm=false", 0.6)],
    "codes": [("codes:books=4,codewords=8", 0.6), ("codes:books=3,codewords=5", 0.7)],
    "memcom": [("memcom:buckets=48", 0.8), ("memcom:buckets=48,bias=true,hash=universal", 0.8)],
    "tt": [("tt:cores=2,rank=8", 0.8), ("tt:cores=3,rank=4", 0.9)],
    # add/concat rows are additive in (quotient, remainder): with 16 buckets a linear head cannot fit the
    # random labels of test_training_lowers_the_loss (loss floor ~1.28) and concat's LS optimum is 0.938.
    "qr": [("qr:buckets=16", 0.9), ("qr:buckets=64,combine=add", 0.9), ("qr:buckets=64,combine=concat", 0.9)],
    "pq": [("pq:groups=4,codewords=16", 0.5), ("pq:groups=6,codewords=5", 0.6),
           ("pq:groups=4,codewords=16,rotation=pca", 0.5)],
}
