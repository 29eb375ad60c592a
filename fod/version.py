"""The version of the fod package (a leaf module: the modules that report it do not import the package)."""
__version__ = "0.1.0"
