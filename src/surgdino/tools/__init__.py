"""Offline tools. ``surgdino.tools.convert_convnext.convert_convnext``: ConvNeXt weight conversion
(``surgdino convert convnext``). Submodules are imported on use, so the command line stays fast."""
