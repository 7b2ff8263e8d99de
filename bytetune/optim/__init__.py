"""bytetune.optim"""
