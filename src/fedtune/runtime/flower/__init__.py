"""Deployment on Flower: the only package (with ray_pool) that imports Flower."""
