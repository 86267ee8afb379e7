"""Rounds, second half: the round columns filled by 0004 become required, and the queue counts per round."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("feedback", "0005_rounds"),
    ]

    operations = [
        *(
            migrations.AlterField(
                model_name=model_name,
                name="round",
                field=models.ForeignKey(
                    on_delete=django.db.models.deletion.CASCADE, related_name=related_name, to="feedback.round"
                ),
            )
            for model_name, related_name in [
                ("assignment", "assignments"),
                ("completion", "completions"),
                ("pairwisejudgement", "%(class)ss"),
                ("rankingjudgement", "%(class)ss"),
            ]
        ),
        migrations.RemoveConstraint(
            model_name="rankingjudgement",
            name="one_ranking_judgement_per_annotator_prompt",
        ),
        migrations.AddConstraint(
            model_name="rankingjudgement",
            constraint=models.UniqueConstraint(
                fields=("annotator", "prompt", "round"), name="one_ranking_judgement_per_annotator_prompt_round"
            ),
        ),
        migrations.RemoveIndex(
            model_name="prompt",
            name="prompt_queue_order",
        ),
        migrations.RemoveField(
            model_name="prompt",
            name="judgement_count",
        ),
    ]
