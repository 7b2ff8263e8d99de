"""bytetune.trainer"""
