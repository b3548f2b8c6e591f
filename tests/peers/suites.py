"""The peers' own test files run against emflow: one row per file.

Each row names a test file inside an installed peer package (scikit-learn, hmmlearn), the
import lines to rewrite so the estimator under test is emflow's (nothing else changes), the
emflow names it needs, and the tests left out, each with its reason. Two kinds of entries:

``excluded``
    Tests of the peer's private helpers (functions or methods whose name starts with ``_``,
    internal modules): deselected, never run. Allowed for nothing else.
``xfail``
    Run, but expected to fail until a named issue lands; reported as XFAIL
    (or XPASS), never hidden.

Patterns are matched against ``Class::test_name[params]`` (``Class::`` only inside a
class); ``*`` is the only wildcard, and a pattern without ``[`` also matches every
parametrization. A pattern that matches no collected test is an error (the peer's file
changed: update the row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Suite", "SUITES", "suite_by_name"]


@dataclass(frozen=True)
class Suite:
    """One peer test file and how it is run against emflow.

    Parameters
    ----------
    name : str
        Short name for ``--suite``.
    peer_file : str
        The file, relative to the installed package's site directory.
    rewrites : tuple of (str, str)
        Exact source lines and their replacements; each must occur in the file.
    identity : tuple of str
        Attribute paths in the rewritten test module that must resolve to emflow objects.
    helpers : tuple of str
        Files of the peer copied beside the test file (package ``__init__``, conftest).
    plugins : tuple of str
        Pytest plugins loaded by module name from the installed peer (its conftest).
    requires : tuple of str
        emflow names the suite needs; when one is missing the suite is reported MISSING.
    expected_missing : bool
        True while emflow is known to lack ``requires`` (the suite then xfails).
    excluded, xfail : dict of str to str
        Pattern to reason (see the module docstring).
    env : dict of str to str
        Environment of the run (fixed seeds).
    """

    name: str
    peer_file: str
    rewrites: tuple
    identity: tuple
    helpers: tuple = ()
    plugins: tuple = ()
    requires: tuple = ()
    expected_missing: bool = False
    excluded: dict = field(default_factory=dict)
    xfail: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    note: str = ""


_SK_ENV = {"SKLEARN_TESTS_GLOBAL_RANDOM_SEED": "42"}
# hmmlearn's conftest seeds np.random from HMMLEARN_SEED (random when unset): fixed here
_HMM_ENV = {"HMMLEARN_SEED": "42"}
_HMM_HELPERS = ("hmmlearn/tests/__init__.py", "hmmlearn/tests/conftest.py")
_HMM_IMPORT = ("from hmmlearn import hmm", "import emflow as hmm")
_HMM_IMPORT_REL = ("from .. import hmm", "import emflow as hmm")

_PRIVATE_SK = "tests scikit-learn's private helper {}"

SUITES = (
    Suite(
        name="gaussian_mixture",
        peer_file="sklearn/mixture/tests/test_gaussian_mixture.py",
        rewrites=(("from sklearn.mixture import GaussianMixture",
                   "from emflow import GaussianMixture"),),
        identity=("GaussianMixture",),
        plugins=("sklearn.conftest",),
        env=_SK_ENV,
        excluded={
            "test_suffstat_sk_full": _PRIVATE_SK.format("_estimate_gaussian_covariances_full"),
            "test_suffstat_sk_tied": _PRIVATE_SK.format("_estimate_gaussian_covariances_tied"),
            "test_suffstat_sk_diag": _PRIVATE_SK.format("_estimate_gaussian_covariances_diag"),
            "test_gaussian_suffstat_sk_spherical":
                _PRIVATE_SK.format("_estimate_gaussian_covariances_spherical"),
            "test_compute_log_det_cholesky": _PRIVATE_SK.format("_compute_log_det_cholesky"),
            "test_gaussian_mixture_log_probabilities":
                _PRIVATE_SK.format("_estimate_log_gaussian_prob"),
            "test_gaussian_mixture_n_parameters":
                "tests the private method GaussianMixture._n_parameters() alone",
            "test_gaussian_mixture_precisions_init":
                "tests the private methods GaussianMixture._set_parameters and _initialize",
            "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters":
                "counts calls of scikit-learn's private _estimate_gaussian_parameters (mocked)",
        },
        note="test_gaussian_mixture_aic_bic is kept: it tests the public aic/bic, taking the "
             "expected parameter count from the private _n_parameters().",
    ),
    Suite(
        name="mixture",
        peer_file="sklearn/mixture/tests/test_mixture.py",
        rewrites=(("from sklearn.mixture import BayesianGaussianMixture, GaussianMixture",
                   "from emflow import BayesianGaussianMixture, GaussianMixture"),),
        identity=("GaussianMixture", "BayesianGaussianMixture"),
        plugins=("sklearn.conftest",),
        env=_SK_ENV,
    ),
    Suite(
        name="bayesian_mixture",
        peer_file="sklearn/mixture/tests/test_bayesian_mixture.py",
        rewrites=(("from sklearn.mixture import BayesianGaussianMixture",
                   "from emflow import BayesianGaussianMixture"),),
        identity=("BayesianGaussianMixture",),
        plugins=("sklearn.conftest",),
        env=_SK_ENV,
        excluded={
            "test_log_dirichlet_norm": _PRIVATE_SK.format("_log_dirichlet_norm"),
            "test_log_wishart_norm": _PRIVATE_SK.format("_log_wishart_norm"),
            "test_compare_covar_type":
                "calls the private methods BayesianGaussianMixture._check_parameters and _initialize_parameters",
        },
    ),
    Suite(
        name="online_lda",
        peer_file="sklearn/decomposition/tests/test_online_lda.py",
        rewrites=(("from sklearn.decomposition import LatentDirichletAllocation",
                   "from emflow import LatentDirichletAllocation"),),
        identity=("LatentDirichletAllocation",),
        plugins=("sklearn.conftest",),
        env=_SK_ENV,
        excluded={
            "test_dirichlet_expectation":
                _PRIVATE_SK.format("_dirichlet_expectation_1d/_2d (Cython)"),
            "test_lda_preplexity_mismatch":
                "tests the private method LatentDirichletAllocation._perplexity_precomp_distr",
        },
    ),
    Suite(
        name="gaussian_hmm",
        peer_file="hmmlearn/tests/test_gaussian_hmm.py",
        rewrites=(_HMM_IMPORT_REL,),
        identity=("hmm.GaussianHMM",),
        helpers=_HMM_HELPERS,
        env=_HMM_ENV,
        excluded={
            "*::test_fit_too_little_data":
                "tests the log message of hmmlearn's private _init(X, lengths)",
            "*::test_covar_is_writeable":
                "tests the private _covars_ array after the private _init",
        },
    ),
    Suite(
        name="categorical_hmm",
        peer_file="hmmlearn/tests/test_categorical_hmm.py",
        rewrites=(_HMM_IMPORT,),
        identity=("hmm.CategoricalHMM",),
        helpers=_HMM_HELPERS,
        env=_HMM_ENV,
        excluded={
            "*::test__check_and_set_categorical_n_features":
                "tests hmmlearn's private _check_and_set_n_features",
        },
    ),
    Suite(
        name="poisson_hmm",
        peer_file="hmmlearn/tests/test_poisson_hmm.py",
        rewrites=(_HMM_IMPORT,),
        identity=("hmm.PoissonHMM",),
        helpers=_HMM_HELPERS,
        env=_HMM_ENV,
        requires=("PoissonHMM",),
    ),
    Suite(
        name="gmm_hmm",
        peer_file="hmmlearn/tests/test_gmm_hmm.py",
        rewrites=(_HMM_IMPORT,),
        identity=("hmm.GMMHMM",),
        helpers=_HMM_HELPERS,
        env=_HMM_ENV,
        requires=("GMMHMM",),
        note="hmmlearn marks this whole file xfail (pytestmark); its maintained GMMHMM tests "
             "are test_gmm_hmm_new.py (suite gmm_hmm_new).",
    ),
    Suite(
        name="gmm_hmm_new",
        peer_file="hmmlearn/tests/test_gmm_hmm_new.py",
        rewrites=(("from ..hmm import GMMHMM", "from emflow import GMMHMM"),),
        identity=("GMMHMM",),
        # create_random_gmm comes from the (unmodified, not collected) old GMMHMM test file
        helpers=_HMM_HELPERS + ("hmmlearn/tests/test_gmm_hmm.py",),
        env=_HMM_ENV,
        requires=("GMMHMM",),
        excluded={
            "*::test_check_good_covariance_type": "calls only hmmlearn's private _check()",
            "*::test_init": "tests hmmlearn's private _init(X, lengths) and _check()",
        },
    ),
)


def suite_by_name(name):
    """The row called ``name``; a ValueError naming the allowed names otherwise."""
    for suite in SUITES:
        if suite.name == name:
            return suite
    raise ValueError(f"suite must be one of {[s.name for s in SUITES]}, got {name!r}")
