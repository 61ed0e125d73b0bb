"""Weight files: safe reading (safetensors, weights-only pickles), kind detection by keys, strict assignment on the
meta device, conversion, the models folder layout, and weight streaming."""
