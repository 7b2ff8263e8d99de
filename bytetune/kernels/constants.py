"""Numbers several floors agree on, each written once (the lowest floor that needs it is this one).

``INT8_MAX``: the largest int8 code of the symmetric formats (LLM.int8() rows and tokens,
ZeroQuant groups): a value v is stored as round(INT8_MAX * v / absmax), so codes lie in
[-127, 127] and -128 is never used. An int, so that it is exact wherever it goes (tensor
arithmetic promotes it to the tensor's float dtype; a Triton constexpr keeps it integral).

``IGNORE_INDEX``: the label value no loss is taken on (prompt tokens, padding); the same value as
torch.nn.functional.cross_entropy's default ``ignore_index``.
"""

INT8_MAX = 127
IGNORE_INDEX = -100
