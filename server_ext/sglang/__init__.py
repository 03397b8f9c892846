"""SGLang plugin (0.5.16, 0.5.23): the ``leyline`` radix-cache backend (splices, content reuse).

Importing this package does not import SGLang; `leyline.server.sglang.plugin.register` is the
``sglang.srt.plugins`` entry point. See docs/sglang.md.
"""
