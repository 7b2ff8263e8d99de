"""Constants every quantized format here shares."""

# Largest int8 code magnitude: codes are symmetric in [-127, 127] (never -128), so a scale
# absmax / 127 maps +-absmax exactly onto the end codes.
INT8_MAX = 127
