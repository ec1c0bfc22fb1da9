"""parallel/dp_sync"""
