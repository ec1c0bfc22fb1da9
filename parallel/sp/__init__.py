"""parallel/sp"""
