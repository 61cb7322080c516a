"""Reusable pieces of the deploys: pyinfra ``@deploy`` functions composed by deploys/*.py."""
