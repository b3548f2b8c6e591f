"""Seeded generators of synthetic data with known truth, written straight to Zarr in chunks.

Every generator is reproducible (the same seed gives the same bytes whatever the chunking
of the work) and stores the true parameters in the dataset's attributes.
"""

from .gmm import make_gmm_params, sample_gmm, write_gmm
from .hmm import make_hmm_params, sample_hmm, write_hmm
from .lda import make_lda_params, sample_lda, write_lda
from .lgssm import make_lgssm_params, sample_lgssm, write_lgssm

__all__ = [
    "make_gmm_params", "sample_gmm", "write_gmm",
    "make_hmm_params", "sample_hmm", "write_hmm",
    "make_lda_params", "sample_lda", "write_lda",
    "make_lgssm_params", "sample_lgssm", "write_lgssm",
]
