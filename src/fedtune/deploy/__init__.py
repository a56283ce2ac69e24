"""Deployment on Flower: ``fedtune server`` / ``client`` / ``certs`` and the processes they manage.

Above the runtimes: the coordinator runs the ordinary experiment with ``runtime.flower_grid`` as its
transport; a participant serves its requests with the same client handler simulations use.
"""
