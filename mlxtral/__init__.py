"""mlxtral"""
