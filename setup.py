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
    package_data={"twisted.plugins": ["xaind_plugins.py"]},
    install_requires=[
        "twisted[tls]>=22.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "service-identity>=18.1",
    ],
    extras_require={
        # xain-sdk and xain-aggregators are the seed's participant SDK and
        # aggregators: the compatibility tests run them unchanged.
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.13",
            "hypothesis>=6",
            "xain-sdk==0.8.0",
            "xain-aggregators==0.8.0",
            # The house-prices example's plot-metrics is tested for real.
            "matplotlib>=3.5",
        ],
        # examples/house_prices: plot-metrics draws its plots with matplotlib.
        "examples": ["matplotlib>=3.5"],
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
