"""bytetune.quant_layers"""
