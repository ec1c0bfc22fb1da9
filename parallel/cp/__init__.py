"""parallel/cp"""
