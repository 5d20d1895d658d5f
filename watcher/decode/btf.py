# TEMPORARY shim until the BTF module lands.
try:
    from watcher.kernel.btf import BtfError, parse_btf  # noqa: F401
except ImportError:
    class BtfError(ValueError):
        pass

    def parse_btf(raw):
        raise BtfError("no BTF support yet")
