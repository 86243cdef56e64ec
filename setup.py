"""The compiled part of the data path (snapfs/_fastpath.c). Optional: where it cannot be built
(no C compiler or no Python headers), snapfs serves every READ from Python."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "snapfs._fastpath",
            ["snapfs/_fastpath.c"],
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
            optional=True,
        )
    ]
)
