"""trainer/models/llama"""
