"""The SGLang plugin: a radix-cache backend that applies Leyline directives inside SGLang."""
