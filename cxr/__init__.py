"""cxr: the composition root. The CLI, the runtime (Ray), and the order of the stages live here."""
__version__ = "0.1.0"
