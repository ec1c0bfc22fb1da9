"""parallel/engines"""
