"""`python -m faq_deploy` is `faq-deploy`, for environments without the console script."""

from faq_deploy.cli import main

main()
