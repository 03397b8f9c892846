"""SGLang 0.5.16 plugin: the ``leyline`` radix-cache backend (directive splices, content reuse).

Importing this package does not import SGLang; `leyline.server.sglang.plugin.register` is the
``sglang.srt.plugins`` entry point. See docs/sglang.md.
"""
