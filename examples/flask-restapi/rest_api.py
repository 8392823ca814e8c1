"""A small patient-record REST API, the application the confidential-image example protects.

POST /patient/<id>  stores a record from form fields and gives it a random score (403 if the
                    id exists); GET /patient/<id> returns it (404 if unknown);
GET /score/<id>     returns {"id": ..., "score": ...}.

Records live in memory only. The service speaks HTTPS on port 4996 with the certificate and
key in /tls; in the confidential image those two files are injected after attestation.
"""

import random

from flask import Flask
from flask_restful import Api, Resource, abort, reqparse

FIELDS = (
    "fname", "lname", "address", "city", "state", "ssn", "email", "dob", "contactphone",
    "drugallergies", "preexistingconditions", "dateadmitted", "insurancedetails",
)

app = Flask(__name__)
api = Api(app)
patients = {}

parser = reqparse.RequestParser()
for field in FIELDS:
    parser.add_argument(field, location="form", type=str)


def lookup(patient_id):
    if patient_id not in patients:
        abort(404, message=f"patient {patient_id} not found")
    return patients[patient_id]


class Patient(Resource):
    def get(self, patient_id):
        return lookup(patient_id)

    def post(self, patient_id):
        if patient_id in patients:
            abort(403, message=f"patient {patient_id} already exists")
        record = dict(parser.parse_args())
        record["id"] = patient_id
        record["score"] = random.random()  # noqa: S311 - a demo value, not a secret
        patients[patient_id] = record
        return record, 201


class Score(Resource):
    def get(self, patient_id):
        return {"id": patient_id, "score": lookup(patient_id)["score"]}


api.add_resource(Patient, "/patient/<string:patient_id>")
api.add_resource(Score, "/score/<string:patient_id>")

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=4996, threaded=True,  # noqa: S104 - served inside a container
            ssl_context=("/tls/flask.crt", "/tls/flask.key"))
